"""Tests for avb.estimators' importance-weighted bound, score-function
estimator and gradient-variance statistics.

Oracles use no avb code: a linear-Gaussian model with known log p(x) and
closed-form ELBO for the importance-weighted bound, the analytic gradient of
E_q[f] for a quadratic f for the score-function estimator, and numpy's
covariance for the variance statistics. Monte Carlo checks allow 5 standard
errors estimated from the same samples; seeds are fixed, so the tests are
deterministic.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from avb import distributions
from avb import estimators

NUM_STANDARD_ERRORS = 5.0
NUM_DATA = 4
BATCH = 3
NOISE_VAR = 0.25


@pytest.fixture(autouse=True)
def x64():
  """Runs every test in float64: closed-form comparisons need the precision."""
  with jax.enable_x64(True):
    yield


def _key(seed: int) -> jax.Array:
  """A PRNG key of the "rbg" implementation.

  The code under test takes any key. On CPU, XLA compiles a threefry draw
  (the default) in about a second per call site, which would dominate these
  tests' run time; RngBitGenerator compiles in a fraction of that.
  """
  return jax.random.key(seed, impl="rbg")


class LinearGaussian:
  """z ~ N(0, I_J), x | z ~ N(W z + b, NOISE_VAR I_D), a fixed batch x [B, D].

  W has orthogonal columns, so the exact posterior is a diagonal Gaussian.
  """

  def __init__(self, scales=(1.5, 0.8), seed: int = 0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(NUM_DATA, len(scales))))
    self.W = q * np.array(scales)  # [D, J]
    self.b = rng.normal(size=NUM_DATA)  # [D]
    z = rng.normal(size=(BATCH, len(scales)))
    self.x = (z @ self.W.T + self.b
              + np.sqrt(NOISE_VAR) * rng.normal(size=(BATCH, NUM_DATA)))

  def log_likelihood_fn(self, z: jax.Array) -> jax.Array:
    """log p(x|z), z: [L, B, J] -> [L, B]."""
    residual = self.x - (z @ self.W.T + self.b)  # [L, B, D]
    return -0.5 * jnp.sum(
        residual**2 / NOISE_VAR + np.log(2 * np.pi * NOISE_VAR), axis=-1)

  def log_marginal(self) -> np.ndarray:
    cov = self.W @ self.W.T + NOISE_VAR * np.eye(NUM_DATA)
    return stats.multivariate_normal.logpdf(self.x, mean=self.b, cov=cov)

  def exact_posterior(self):
    var = 1.0 / (1.0 + np.sum(self.W**2, axis=0) / NOISE_VAR)  # [J]
    mean = var * ((self.x - self.b) @ self.W) / NOISE_VAR  # [B, J]
    return mean, np.broadcast_to(np.log(var), mean.shape).copy()

  def mismatched_posterior(self):
    """Shifted and wider than p(z|x), so importance weights stay bounded."""
    mean, log_var = self.exact_posterior()
    return mean + np.array([0.5, -0.3]), log_var + np.array([0.5, 0.3])

  def closed_form_elbo(self, mean, log_var) -> np.ndarray:
    var = np.exp(log_var)
    residual = self.x - (mean @ self.W.T + self.b)
    expected_log_likelihood = -0.5 * (
        NUM_DATA * np.log(2 * np.pi * NOISE_VAR)
        + (np.sum(residual**2, -1) + var @ np.sum(self.W**2, 0)) / NOISE_VAR)
    kl = 0.5 * np.sum(mean**2 + var - 1.0 - log_var, axis=-1)
    return expected_log_likelihood - kl


MODEL = LinearGaussian()

# Jitted once per (log_likelihood_fn, num_samples): eager calls compile every
# primitive separately, which costs more than the whole jitted function.
_iwae_bound = jax.jit(estimators.iwae_bound, static_argnums=(3, 4))
_sgvb_a = jax.jit(estimators.sgvb_a, static_argnums=(3, 4))


# ----------------------------------------------------------------------------
# The importance-weighted bound.


def test_iwae_with_one_sample_is_estimator_a():
  mean, log_var = MODEL.mismatched_posterior()
  for seed in range(3):
    rng = _key(seed)
    bound = _iwae_bound(rng, mean, log_var, MODEL.log_likelihood_fn, 1)
    elbo = _sgvb_a(rng, mean, log_var, MODEL.log_likelihood_fn, 1)["elbo"]
    assert bound.shape == (BATCH,)
    np.testing.assert_allclose(bound, elbo, rtol=1e-12)


def test_iwae_is_log_marginal_at_the_exact_posterior():
  # Every importance weight is p(x) exactly, whatever K.
  mean, log_var = MODEL.exact_posterior()
  for num_samples in (1, 6):
    bound = _iwae_bound(_key(1), mean, log_var, MODEL.log_likelihood_fn,
                        num_samples)
    np.testing.assert_allclose(bound, MODEL.log_marginal(), rtol=1e-10)


def test_iwae_is_logsumexp_of_the_log_weights():
  mean, log_var = MODEL.mismatched_posterior()
  rng = _key(2)
  num_samples = 6
  bound = _iwae_bound(rng, mean, log_var, MODEL.log_likelihood_fn,
                      num_samples)
  # The documented samples: sgvb_a's for the same key and L = K.
  z = np.asarray(_sgvb_a(rng, mean, log_var, MODEL.log_likelihood_fn,
                         num_samples)["z"])
  log_weights = (np.asarray(MODEL.log_likelihood_fn(z))
                 + stats.norm.logpdf(z).sum(-1)
                 - stats.norm.logpdf(z, mean, np.exp(0.5 * log_var)).sum(-1))
  want = np.log(np.mean(np.exp(log_weights), axis=0))
  np.testing.assert_allclose(bound, want, rtol=1e-10)


IWAE_NUM_SAMPLES = (1, 4, 32, 256)


@jax.jit
def _iwae_draws(rngs, mean, log_var):
  """Independent bounds per key and K, averaged over the batch: [len(Ks), S]."""
  return jnp.stack([
      jax.vmap(lambda rng, k=num_samples: jnp.mean(estimators.iwae_bound(
          rng, mean, log_var, MODEL.log_likelihood_fn, k)))(rngs)
      for num_samples in IWAE_NUM_SAMPLES])


def test_iwae_increases_with_num_samples_towards_log_marginal():
  mean, log_var = MODEL.mismatched_posterior()
  log_marginal = MODEL.log_marginal().mean()
  elbo = MODEL.closed_form_elbo(mean, log_var).mean()
  assert log_marginal - elbo > 0.5  # a clearly loose q
  num_seeds = 1000
  rngs = jax.random.split(_key(3), num_seeds)
  draws = np.asarray(_iwae_draws(rngs, mean, log_var))  # [len(Ks), S]
  means = draws.mean(1)
  errors = draws.std(1, ddof=1) / np.sqrt(num_seeds)
  # K = 1 is the ELBO in expectation.
  assert abs(means[0] - elbo) < NUM_STANDARD_ERRORS * errors[0]
  # Non-decreasing in K (allowing for noise), below log p(x) ...
  step_errors = np.sqrt(errors[1:]**2 + errors[:-1]**2)
  assert np.all(np.diff(means) > -NUM_STANDARD_ERRORS * step_errors)
  assert np.all(means < log_marginal + NUM_STANDARD_ERRORS * errors)
  # ... and approaching it.
  gap = log_marginal - means
  assert np.all(np.diff(gap) < 0)
  assert gap[-1] < 0.05 * gap[0]


def test_iwae_gradient_matches_finite_differences():
  mean, log_var = (jnp.asarray(a) for a in MODEL.mismatched_posterior())
  rng = _key(4)

  @jax.jit
  def objective(mean, log_var):
    return jnp.sum(estimators.iwae_bound(
        rng, mean, log_var, MODEL.log_likelihood_fn, 5))

  grads = jax.grad(objective, argnums=(0, 1))(mean, log_var)
  eps = 1e-6
  for index, (arg, grad) in enumerate(zip((mean, log_var), grads)):
    numeric = np.zeros(arg.size)
    for flat in range(arg.size):
      step = np.zeros(arg.size)
      step[flat] = eps
      args_plus = [mean, log_var]
      args_minus = [mean, log_var]
      args_plus[index] = arg + step.reshape(arg.shape)
      args_minus[index] = arg - step.reshape(arg.shape)
      numeric[flat] = (objective(*args_plus)
                       - objective(*args_minus)) / (2 * eps)
    np.testing.assert_allclose(np.ravel(grad), numeric, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------
# The score-function estimator, on f(z) = sum_j a_j (z_j - c_j)^2 + offset,
# where E_q[f] = sum_j a_j ((m_j - c_j)^2 + v_j) + offset, so
# d/dm = 2 a (m - c) and d/dlog_var = a v.

QUADRATIC_A = np.array([1.0, -0.5])
QUADRATIC_C = np.array([1.0, 0.0])
QUADRATIC_OFFSET = 20.0
Q_MEAN = np.array([0.5, -1.0])
Q_LOG_VAR = np.array([-0.5, 0.3])
NUM_REPLICAS = 20_000  # independent estimates: rows of one batch
NUM_SCORE_SAMPLES = 2


def _quadratic(z: jax.Array) -> jax.Array:  # [L, B, J] -> [L, B]
  return (jnp.sum(QUADRATIC_A * jnp.square(z - QUADRATIC_C), axis=-1)
          + QUADRATIC_OFFSET)


def _analytic_gradient() -> tuple[np.ndarray, np.ndarray]:
  return (2 * QUADRATIC_A * (Q_MEAN - QUADRATIC_C),
          QUADRATIC_A * np.exp(Q_LOG_VAR))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _score_and_reparameterized_grads(baseline_name, num_samples, rng):
  """Per-row gradients [N, J] w.r.t. (mean, log_var) of both estimators.

  Each row of the batch is the same q with its own noise, so row n's gradient
  is one independent estimate of grad E_q[f].
  """
  mean = jnp.broadcast_to(Q_MEAN, (NUM_REPLICAS, 2))
  log_var = jnp.broadcast_to(Q_LOG_VAR, (NUM_REPLICAS, 2))
  baseline = {"none": None, "constant": QUADRATIC_OFFSET,
              "leave_one_out": "leave_one_out"}[baseline_name]

  def score(mean, log_var):
    return jnp.sum(estimators.score_function_surrogate(
        rng, mean, log_var, _quadratic, num_samples, baseline=baseline))

  def reparameterized(mean, log_var):
    z = distributions.gaussian_sample(rng, mean, log_var, num_samples)
    return jnp.sum(jnp.mean(_quadratic(z), axis=0))

  return (jax.grad(score, argnums=(0, 1))(mean, log_var),
          jax.grad(reparameterized, argnums=(0, 1))(mean, log_var))


@functools.cache
def _gradient_draws(baseline_name: str):
  with jax.enable_x64(True):
    score, reparameterized = _score_and_reparameterized_grads(
        baseline_name, NUM_SCORE_SAMPLES, _key(5))
  return ([np.asarray(g) for g in score],
          [np.asarray(g) for g in reparameterized])


def _standard_error(draws: np.ndarray) -> np.ndarray:
  return draws.std(0, ddof=1) / np.sqrt(draws.shape[0])


@pytest.mark.parametrize("baseline", ["none", "constant", "leave_one_out"])
def test_score_function_gradient_is_unbiased(baseline):
  score, reparameterized = _gradient_draws(baseline)
  for draws, analytic in zip(score, _analytic_gradient()):
    np.testing.assert_array_less(
        np.abs(draws.mean(0) - analytic),
        NUM_STANDARD_ERRORS * _standard_error(draws))
  # The same expectation as the reparameterized gradient.
  for score_draws, reparameterized_draws in zip(score, reparameterized):
    difference = score_draws.mean(0) - reparameterized_draws.mean(0)
    error = np.hypot(_standard_error(score_draws),
                     _standard_error(reparameterized_draws))
    np.testing.assert_array_less(np.abs(difference),
                                 NUM_STANDARD_ERRORS * error)


def test_reparameterized_gradient_is_unbiased():
  # Guards the comparison above: the oracle agrees with the pathwise estimate.
  _, reparameterized = _gradient_draws("none")
  for draws, analytic in zip(reparameterized, _analytic_gradient()):
    np.testing.assert_array_less(
        np.abs(draws.mean(0) - analytic),
        NUM_STANDARD_ERRORS * _standard_error(draws) + 1e-12)


def test_score_function_variance_is_much_larger_and_baselines_reduce_it():
  def total_variance(draws):
    tree = {"mean": draws[0], "log_var": draws[1]}
    return float(estimators.gradient_variance_stats(tree)["total"]["trace_cov"])

  variance = {name: total_variance(_gradient_draws(name)[0])
              for name in ("none", "constant", "leave_one_out")}
  variance_reparameterized = total_variance(_gradient_draws("none")[1])
  # With the offset in f and no baseline, f's mean multiplies the score.
  assert variance["none"] > 100 * variance_reparameterized
  # Baselines remove most of that, but the score function stays noisier.
  assert variance["constant"] < 0.2 * variance["none"]
  assert variance["leave_one_out"] < 0.2 * variance["none"]
  assert variance["leave_one_out"] > 3 * variance_reparameterized


def test_score_function_surrogate_value_and_exact_gradient():
  rng_np = np.random.default_rng(6)
  mean = rng_np.normal(size=(BATCH, 2))
  log_var = rng_np.uniform(-1.0, 0.5, size=(BATCH, 2))
  rng = _key(7)
  num_samples = 3
  # The documented samples: gaussian_sample's (and sgvb_a's) for the key.
  z = np.asarray(distributions.gaussian_sample(
      rng, mean, log_var, num_samples))  # [L, B, J]
  values = np.asarray(_quadratic(jnp.asarray(z)))  # [L, B]
  var = np.exp(log_var)
  score_mean = (z - mean) / var  # d log q / d mean, [L, B, J]
  score_log_var = 0.5 * ((z - mean)**2 / var - 1.0)
  leave_one_out = (values.sum(0) - values) / (num_samples - 1)
  baselines = (None, 1.5, "leave_one_out")

  @jax.jit
  def values_and_grads(mean, log_var):  # one (value [B], grads) per baseline
    results = []
    for baseline in baselines:
      surrogate = functools.partial(
          estimators.score_function_surrogate, rng, f=_quadratic,
          num_samples=num_samples, baseline=baseline)
      grads = jax.grad(lambda m, v: jnp.sum(surrogate(m, v)), argnums=(0, 1))
      results.append((surrogate(mean, log_var), grads(mean, log_var)))
    return results

  results = values_and_grads(jnp.asarray(mean), jnp.asarray(log_var))
  for subtracted, (value, grads) in zip((0.0, 1.5, leave_one_out), results):
    np.testing.assert_allclose(value, values.mean(0), rtol=1e-12)
    weights = (values - subtracted)[..., None]  # [L, B, 1]
    np.testing.assert_allclose(grads[0], np.mean(weights * score_mean, 0),
                               rtol=1e-10)
    np.testing.assert_allclose(grads[1], np.mean(weights * score_log_var, 0),
                               rtol=1e-10)


def test_score_function_surrogate_passes_gradients_to_f_parameters():
  mean, log_var = MODEL.mismatched_posterior()
  rng = _key(8)

  def surrogate(weight):
    f = lambda z: weight * jnp.sum(jnp.square(z), axis=-1)
    return jnp.sum(estimators.score_function_surrogate(
        rng, mean, log_var, f, 4, baseline="leave_one_out"))

  z = distributions.gaussian_sample(rng, mean, log_var, 4)
  np.testing.assert_allclose(
      jax.grad(surrogate)(2.0),
      np.sum(np.mean(np.sum(np.square(z), -1), 0)), rtol=1e-12)


def test_score_function_surrogate_rejects_bad_baselines():
  mean, log_var = MODEL.mismatched_posterior()
  with pytest.raises(ValueError, match="num_samples >= 2"):
    estimators.score_function_surrogate(
        jax.random.key(0), mean, log_var, _quadratic, 1,
        baseline="leave_one_out")
  with pytest.raises(ValueError, match="Unknown baseline 'mean'"):
    estimators.score_function_surrogate(
        jax.random.key(0), mean, log_var, _quadratic, 2, baseline="mean")


# ----------------------------------------------------------------------------
# Gradient-variance statistics.


def test_gradient_variance_stats_match_numpy():
  rng = np.random.default_rng(9)
  num = 50
  tree = {"kernel": rng.normal(loc=0.3, size=(num, 3, 2)),
          "bias": rng.normal(loc=-1.0, scale=2.0, size=(num,))}
  result = estimators.gradient_variance_stats(
      jax.tree.map(jnp.asarray, tree))
  flat = {key: value.reshape(num, -1) for key, value in tree.items()}
  flat["total"] = np.concatenate([flat["kernel"], flat["bias"]], axis=1)
  for key, g in flat.items():
    got = (result["total"] if key == "total"
           else {k: v[key] for k, v in result["per_leaf"].items()})
    trace_cov = np.trace(np.atleast_2d(np.cov(g, rowvar=False)))
    mean_norm = np.linalg.norm(g.mean(0))
    np.testing.assert_allclose(got["trace_cov"], trace_cov, rtol=1e-12)
    np.testing.assert_allclose(got["mean_sq_norm"],
                               np.mean(np.sum(g**2, 1)), rtol=1e-12)
    np.testing.assert_allclose(got["mean_norm"], mean_norm, rtol=1e-12)
    np.testing.assert_allclose(got["snr"], mean_norm / np.sqrt(trace_cov),
                               rtol=1e-12)
    # The documented identity between the three.
    np.testing.assert_allclose(
        got["mean_sq_norm"],
        got["mean_norm"]**2 + (num - 1) / num * got["trace_cov"], rtol=1e-12)


def test_gradient_variance_stats_of_per_example_grads():
  # The intended use: N keys for one example -> N gradient estimates.
  mean, log_var = MODEL.mismatched_posterior()

  def loss(params, rng):
    terms = estimators.sgvb_b(rng, params["mean"], params["log_var"],
                              MODEL.log_likelihood_fn)
    return -jnp.sum(terms["elbo"])

  params = {"mean": jnp.asarray(mean), "log_var": jnp.asarray(log_var)}
  grads = jax.jit(estimators.per_example_grads, static_argnums=0)(
      loss, params, jax.random.split(_key(10), 64))
  result = estimators.gradient_variance_stats(grads)
  assert set(result["per_leaf"]["snr"]) == {"mean", "log_var"}
  assert np.isfinite(result["total"]["snr"]) and result["total"]["snr"] > 0


def test_gradient_variance_stats_rejects_bad_input():
  with pytest.raises(ValueError, match="N >= 2"):
    estimators.gradient_variance_stats({"a": jnp.zeros((1, 3))})
  with pytest.raises(ValueError, match="same leading"):
    estimators.gradient_variance_stats(
        {"a": jnp.zeros((4, 3)), "b": jnp.zeros((5,))})
  with pytest.raises(ValueError, match="at least one leaf"):
    estimators.gradient_variance_stats({})
