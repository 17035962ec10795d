"""Tests for avb.estimators on a linear-Gaussian model with known log p(x).

The model is z ~ N(0, I_J), x | z ~ N(W z + b, s^2 I_D), so
x ~ N(b, W W^T + s^2 I) and, for a diagonal q, the ELBO is available in closed
form. W has orthogonal columns, which makes the exact posterior diagonal, so a
diagonal-Gaussian q can equal it. The oracles (scipy's multivariate normal, the
closed-form ELBO, a hand-written decoder log-likelihood) use no avb code.

Monte Carlo checks allow 5 standard errors estimated from the same samples;
seeds are fixed, so the tests are deterministic.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

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


class LinearGaussian:
  """z ~ N(0, I), x | z ~ N(W z + b, NOISE_VAR * I), with a fixed batch x.

  W = Q diag(scales) with orthonormal Q, so a zero scale makes a latent the
  decoder ignores (an inactive unit).
  """

  def __init__(self, scales: tuple[float, ...] = (1.5, 0.8), seed: int = 0):
    rng = np.random.default_rng(seed)
    self.num_latents = len(scales)
    q, _ = np.linalg.qr(rng.normal(size=(NUM_DATA, self.num_latents)))
    self.W = q * np.array(scales)  # [D, J], orthogonal columns
    self.b = rng.normal(size=NUM_DATA)  # [D]
    z = rng.normal(size=(BATCH, self.num_latents))
    self.x = (z @ self.W.T + self.b
              + np.sqrt(NOISE_VAR) * rng.normal(size=(BATCH, NUM_DATA)))

  def log_likelihood_fn(self, z: jax.Array) -> jax.Array:
    """log p(x|z), z: [L, B, J] -> [L, B], written out independently of avb."""
    residual = self.x - (z @ self.W.T + self.b)  # [L, B, D]
    return -0.5 * jnp.sum(
        residual**2 / NOISE_VAR + np.log(2 * np.pi * NOISE_VAR), axis=-1)

  def log_marginal(self) -> np.ndarray:
    """Exact log p(x), [B]."""
    cov = self.W @ self.W.T + NOISE_VAR * np.eye(NUM_DATA)
    return stats.multivariate_normal.logpdf(self.x, mean=self.b, cov=cov)

  def exact_posterior(self) -> tuple[np.ndarray, np.ndarray]:
    """Mean and log-variance of p(z|x), each [B, J]; diagonal since W^T W is."""
    var = 1.0 / (1.0 + np.sum(self.W**2, axis=0) / NOISE_VAR)  # [J]
    mean = var * ((self.x - self.b) @ self.W) / NOISE_VAR  # [B, J]
    return mean, np.broadcast_to(np.log(var), mean.shape).copy()

  def mismatched_posterior(self) -> tuple[np.ndarray, np.ndarray]:
    """A shifted q, wider than p(z|x), so importance weights stay bounded."""
    mean, log_var = self.exact_posterior()
    shift = np.resize([0.5, -0.3], self.num_latents)
    widen = np.resize([0.5, 0.3], self.num_latents)
    return mean + shift, log_var + widen

  def closed_form_elbo(self, mean, log_var) -> np.ndarray:
    """E_q[log p(x|z)] - KL(q || p(z)) for q = N(mean, diag(exp(log_var)))."""
    var = np.exp(log_var)
    residual = self.x - (mean @ self.W.T + self.b)  # [B, D]
    expected_log_likelihood = -0.5 * (
        NUM_DATA * np.log(2 * np.pi * NOISE_VAR)
        + (np.sum(residual**2, -1) + var @ np.sum(self.W**2, 0)) / NOISE_VAR)
    kl = 0.5 * np.sum(mean**2 + var - 1.0 - log_var, axis=-1)
    return expected_log_likelihood - kl


# Shared instances, so that jitted functions taking `log_likelihood_fn` as a
# static argument hit the compilation cache across tests.
MODEL = LinearGaussian()
MODEL_WITH_INACTIVE_LATENTS = LinearGaussian(scales=(1.5, 0.8, 0.0, 0.0))
NUM_DRAWS = 20_000

# Jitted once per (log_likelihood_fn, num_samples, chunk_size): eager calls
# would re-trace the scan on every call.
_importance = jax.jit(
    estimators.importance_log_likelihood, static_argnums=(3, 4, 5))


@functools.partial(jax.jit, static_argnums=0)
def _vmapped_elbos(log_likelihood_fn, rngs, mean, log_var):
  """Both estimators on the same keys, one compilation: {"A", "B"} -> [N, B]."""
  return {
      name: jax.vmap(lambda rng, name=name: estimators.elbo_terms(
          name, rng, mean, log_var, log_likelihood_fn)["elbo"])(rngs)
      for name in ("A", "B")}


@functools.cache
def _all_elbo_draws(model: LinearGaussian, posterior: str, seed: int):
  mean, log_var = getattr(model, f"{posterior}_posterior")()
  rngs = jax.random.split(jax.random.key(seed), NUM_DRAWS)
  with jax.enable_x64(True):
    draws = _vmapped_elbos(model.log_likelihood_fn, rngs, mean, log_var)
  return {name: np.asarray(value) for name, value in draws.items()}


def _elbo_draws(name: str, model: LinearGaussian, posterior: str, seed: int):
  """NUM_DRAWS independent single-sample ELBO estimates, [NUM_DRAWS, B].

  Cached so that several tests read the same draws; `posterior` is "exact" or
  "mismatched". A and B with the same seed see the same z.
  """
  return _all_elbo_draws(model, posterior, seed)[name]


def test_oracle_exact_posterior_satisfies_bayes_rule():
  # Guards the test's own algebra: log p(x) = log p(x|z) + log p(z) - log p(z|x)
  # at any z.
  for model in (MODEL, MODEL_WITH_INACTIVE_LATENTS):
    mean, log_var = model.exact_posterior()
    z = np.random.default_rng(1).normal(size=(1, BATCH, model.num_latents))
    log_joint = (np.asarray(model.log_likelihood_fn(z))[0]
                 + stats.norm.logpdf(z[0]).sum(-1))
    log_posterior = stats.norm.logpdf(
        z[0], mean, np.exp(0.5 * log_var)).sum(-1)
    np.testing.assert_allclose(
        log_joint - log_posterior, model.log_marginal(), rtol=1e-12)
    np.testing.assert_allclose(
        model.closed_form_elbo(mean, log_var), model.log_marginal(),
        rtol=1e-12)


@pytest.mark.parametrize("name", ["A", "B"])
@pytest.mark.parametrize("model", [MODEL, MODEL_WITH_INACTIVE_LATENTS])
def test_estimator_is_unbiased_for_closed_form_elbo(name, model):
  draws = _elbo_draws(name, model, "mismatched", seed=1)
  standard_error = draws.std(0, ddof=1) / np.sqrt(NUM_DRAWS)
  np.testing.assert_array_less(
      np.abs(draws.mean(0)
             - model.closed_form_elbo(*model.mismatched_posterior())),
      NUM_STANDARD_ERRORS * standard_error)


@pytest.mark.parametrize("model", [MODEL, MODEL_WITH_INACTIVE_LATENTS])
def test_estimators_a_and_b_agree_in_expectation(model):
  # Same seed, hence the same z: the paired difference has a small variance.
  difference = (_elbo_draws("A", model, "mismatched", seed=1)
                - _elbo_draws("B", model, "mismatched", seed=1))
  standard_error = difference.std(0, ddof=1) / np.sqrt(NUM_DRAWS)
  np.testing.assert_array_less(
      np.abs(difference.mean(0)), NUM_STANDARD_ERRORS * standard_error)


def test_estimator_b_has_lower_variance_with_inactive_latents():
  # The regime of the paper's MNIST runs: latents the decoder ignores but whose
  # q differs from the prior add pure noise log p(z) - log q(z) to estimator A,
  # while B integrates their KL exactly.
  model = MODEL_WITH_INACTIVE_LATENTS
  variance_a = _elbo_draws("A", model, "mismatched", seed=1).var(0)
  variance_b = _elbo_draws("B", model, "mismatched", seed=1).var(0)
  assert np.mean(variance_b) < np.mean(variance_a)


def test_estimator_a_has_lower_variance_near_the_exact_posterior():
  # Not a universal win for B: as q approaches p(z|x), A's summands approach
  # the constant log p(x) while B keeps the noise of log p(x|z).
  variance_a = _elbo_draws("A", MODEL, "mismatched", seed=1).var(0)
  variance_b = _elbo_draws("B", MODEL, "mismatched", seed=1).var(0)
  assert np.mean(variance_a) < np.mean(variance_b)


@pytest.mark.parametrize("name", ["A", "B"])
def test_estimator_terms_are_consistent(name):
  model = MODEL
  mean, log_var = model.mismatched_posterior()
  rng = jax.random.key(3)
  terms = estimators.elbo_terms(
      name, rng, mean, log_var, model.log_likelihood_fn, num_samples=5)
  assert terms["elbo"].shape == (BATCH,)
  assert terms["reconstruction"].shape == (BATCH,)
  assert terms["kl"].shape == (BATCH,)
  assert terms["kl_per_latent"].shape == (BATCH, model.num_latents)
  assert terms["z"].shape == (5, BATCH, model.num_latents)
  np.testing.assert_allclose(
      terms["elbo"], terms["reconstruction"] - terms["kl"], rtol=1e-12)
  np.testing.assert_allclose(
      terms["kl_per_latent"], 0.5 * (mean**2 + np.exp(log_var) - 1 - log_var),
      rtol=1e-12)
  # The same key gives the same z in A, B and gaussian_sample.
  np.testing.assert_allclose(
      terms["z"], distributions.gaussian_sample(rng, mean, log_var, 5),
      rtol=1e-12)
  np.testing.assert_allclose(
      terms["reconstruction"],
      np.mean(np.asarray(model.log_likelihood_fn(terms["z"])), 0), rtol=1e-12)
  direct = estimators.ESTIMATORS[name](
      rng, mean, log_var, model.log_likelihood_fn, num_samples=5)
  for key in terms:
    np.testing.assert_array_equal(terms[key], direct[key])


def test_estimator_a_kl_is_the_monte_carlo_log_ratio():
  model = MODEL
  mean, log_var = model.mismatched_posterior()
  terms = estimators.sgvb_a(
      jax.random.key(4), mean, log_var, model.log_likelihood_fn, num_samples=5)
  z = np.asarray(terms["z"])
  log_ratio = (stats.norm.logpdf(z, mean, np.exp(0.5 * log_var)).sum(-1)
               - stats.norm.logpdf(z).sum(-1))  # [L, B]
  np.testing.assert_allclose(terms["kl"], log_ratio.mean(0), rtol=1e-10)
  terms_b = estimators.sgvb_b(
      jax.random.key(4), mean, log_var, model.log_likelihood_fn, num_samples=5)
  np.testing.assert_allclose(
      terms_b["kl"], np.sum(terms["kl_per_latent"], -1), rtol=1e-12)


def test_exact_posterior_gives_log_marginal_with_zero_variance():
  model = MODEL
  mean, log_var = model.exact_posterior()
  log_marginal = model.log_marginal()
  # Estimator A: every single sample equals log p(x).
  draws_a = _elbo_draws("A", model, "exact", seed=2)
  np.testing.assert_allclose(
      draws_a, np.broadcast_to(log_marginal, draws_a.shape), rtol=1e-10)
  # Estimator B is still noisy (its terms are not the log-ratio), but unbiased.
  draws_b = _elbo_draws("B", model, "exact", seed=2)
  assert np.all(draws_b.std(0) > 1e-3)
  np.testing.assert_array_less(
      np.abs(draws_b.mean(0) - log_marginal),
      NUM_STANDARD_ERRORS * draws_b.std(0, ddof=1) / np.sqrt(NUM_DRAWS))
  estimate = _importance(
      jax.random.key(5), mean, log_var, model.log_likelihood_fn, 100, 30)
  np.testing.assert_allclose(estimate, log_marginal, rtol=1e-10)


def test_importance_estimate_tightens_with_num_samples():
  model = MODEL
  mean, log_var = model.mismatched_posterior()
  log_marginal = model.log_marginal()
  elbo = model.closed_form_elbo(mean, log_var)
  assert np.all(log_marginal - elbo > 0.5)  # a clearly loose q
  num_seeds = 200
  rngs = [jax.random.key(seed) for seed in range(100, 100 + num_seeds)]
  means, errors = [], []
  # A loop over seeds rather than a vmap: it reuses the compilations of the
  # other tests' (K, chunk_size) pairs, and compiling dominates the run time.
  for num_samples, chunk_size in ((1, 1), (10, 10), (100, 30), (1000, 400)):
    estimate = np.array([
        _importance(rng, mean, log_var, model.log_likelihood_fn, num_samples,
                    chunk_size) for rng in rngs])  # [S, B]
    estimate = estimate.mean(-1)  # [S], averaged over the batch
    means.append(estimate.mean())
    errors.append(estimate.std(ddof=1) / np.sqrt(num_seeds))
  means, errors = np.array(means), np.array(errors)
  # K = 1 is the ELBO (estimator A) in expectation.
  assert abs(means[0] - elbo.mean()) < NUM_STANDARD_ERRORS * errors[0]
  # A lower bound that (allowing for noise) never decreases in K ...
  assert np.all(means[1:] >= elbo.mean())
  assert np.all(means <= log_marginal.mean() + NUM_STANDARD_ERRORS * errors)
  step_errors = np.sqrt(errors[1:]**2 + errors[:-1]**2)
  assert np.all(np.diff(means) >= -NUM_STANDARD_ERRORS * step_errors)
  # ... and closes the gap to log p(x).
  gap = log_marginal.mean() - means
  assert gap[-1] < 0.05 * gap[0]
  assert gap[-1] < 0.02


def _reference_importance(rng, mean, log_var, model, num_samples):
  """The unchunked estimate from the documented per-sample keys, in numpy."""
  keys = jax.random.split(rng, num_samples)
  noise = np.asarray(jax.vmap(
      lambda key: jax.random.normal(key, mean.shape, dtype=jnp.float64))(keys))
  z = mean + np.exp(0.5 * log_var) * noise  # [K, B, J]
  log_weights = (
      np.asarray(model.log_likelihood_fn(z))
      + stats.norm.logpdf(z).sum(-1)
      - stats.norm.logpdf(z, mean, np.exp(0.5 * log_var)).sum(-1))  # [K, B]
  return logsumexp(log_weights, axis=0) - np.log(num_samples)


def test_chunked_importance_equals_unchunked():
  model = MODEL
  mean, log_var = model.mismatched_posterior()
  rng = jax.random.key(7)
  num_samples = 1000
  reference = _reference_importance(rng, mean, log_var, model, num_samples)
  # One chunk, 3 chunks of 334 padded by 2, and 143 chunks of 7 padded by 1.
  # The last uses a legacy raw uint32 key, which must split, pad and reshape
  # the same way as a typed key.
  raw_key = jax.random.key_data(rng)
  for chunk_size, key in ((1000, rng), (400, rng), (7, raw_key)):
    estimate = _importance(
        key, mean, log_var, model.log_likelihood_fn, num_samples, chunk_size)
    np.testing.assert_allclose(estimate, reference, rtol=1e-12)


def test_importance_with_many_samples_keeps_decoder_calls_small():
  model = MODEL
  mean, log_var = model.mismatched_posterior()
  seen_sample_counts = []

  def log_likelihood_fn(z):
    seen_sample_counts.append(z.shape[0])  # runs at trace time
    return model.log_likelihood_fn(z)

  estimate = _importance(
      jax.random.key(8), mean, log_var, log_likelihood_fn, 5000, 64)
  # 79 balanced chunks of 64 (5056 samples, the last 56 masked), one trace.
  assert seen_sample_counts == [64]
  assert np.all(np.isfinite(estimate))
  np.testing.assert_allclose(estimate, model.log_marginal(), atol=0.05)


def test_gradients_match_finite_differences():
  # One jitted function returning all three objectives, so the Jacobian and
  # the finite differences each compile once.
  model = MODEL
  mean, log_var = (jnp.asarray(a) for a in model.mismatched_posterior())
  weight = jnp.asarray(model.W)
  rng = jax.random.key(9)

  @jax.jit
  def objectives(mean, log_var, weight):  # -> [3]: A, B, importance
    def log_likelihood_fn(z):
      residual = model.x - (z @ weight.T + model.b)
      return -0.5 * jnp.sum(
          residual**2 / NOISE_VAR + np.log(2 * np.pi * NOISE_VAR), axis=-1)
    values = [
        estimators.elbo_terms(
            name, rng, mean, log_var, log_likelihood_fn, num_samples=3)["elbo"]
        for name in ("A", "B")]
    # 10 samples in chunks of 4: 3 chunks, 2 padded samples.
    values.append(estimators.importance_log_likelihood(
        rng, mean, log_var, log_likelihood_fn, num_samples=10, chunk_size=4))
    return jnp.stack([jnp.sum(v) for v in values])

  args = (mean, log_var, weight)
  jacobians = jax.jit(jax.jacrev(objectives, argnums=(0, 1, 2)))(*args)
  eps = 1e-6
  for index, (arg, jacobian) in enumerate(zip(args, jacobians)):
    numeric = np.zeros((3, arg.size))
    for flat in range(arg.size):
      step = np.zeros(arg.size)
      step[flat] = eps
      plus, minus = list(args), list(args)
      plus[index] = arg + step.reshape(arg.shape)
      minus[index] = arg - step.reshape(arg.shape)
      numeric[:, flat] = (objectives(*plus) - objectives(*minus)) / (2 * eps)
    np.testing.assert_allclose(
        np.asarray(jacobian).reshape(3, -1), numeric, rtol=1e-6, atol=1e-8)


def _bernoulli_vae_loss(params, x, rng):
  """Negative single-example ELBO of a tiny linear Bernoulli VAE; x: [D]."""
  mean = (x @ params["encoder_mean"])[None]  # [1, J]
  log_var = (x @ params["encoder_log_var"])[None]  # [1, J]

  def log_likelihood_fn(z):  # [L, 1, J] -> [L, 1]
    logits = z @ params["decoder"] + params["decoder_bias"]
    return distributions.likelihood_log_prob(
        "bernoulli", x[None], {"logits": logits})

  return -estimators.sgvb_b(
      rng, mean, log_var, log_likelihood_fn, num_samples=2)["elbo"][0]


def test_per_example_grads_equal_a_loop_of_grads():
  rng = np.random.default_rng(10)
  num_data, num_latents, batch = 6, 2, 5
  params = {
      "encoder_mean": jnp.asarray(rng.normal(size=(num_data, num_latents))),
      "encoder_log_var": jnp.asarray(
          0.3 * rng.normal(size=(num_data, num_latents))),
      "decoder": jnp.asarray(rng.normal(size=(num_latents, num_data))),
      "decoder_bias": jnp.zeros(num_data),
  }
  x = jnp.asarray((rng.uniform(size=(batch, num_data)) < 0.5).astype(float))
  rngs = jax.random.split(jax.random.key(11), batch)
  grads = jax.jit(estimators.per_example_grads, static_argnums=0)(
      _bernoulli_vae_loss, params, x, rngs)
  single_grad = jax.jit(jax.grad(_bernoulli_vae_loss))
  for i in range(batch):
    loop_grad = single_grad(params, x[i], rngs[i])
    for key in params:
      assert grads[key].shape == (batch, *params[key].shape)
      np.testing.assert_allclose(grads[key][i], loop_grad[key], rtol=1e-10)
  # Different examples really get different gradients.
  assert not np.allclose(grads["decoder"][0], grads["decoder"][1])


def test_estimators_run_in_float32_under_jit():
  with jax.enable_x64(False):
    model = LinearGaussian()  # its own copy: it is cast to float32 below
    mean, log_var = (jnp.asarray(a, jnp.float32)
                     for a in model.mismatched_posterior())
    model.x, model.W, model.b = (
        np.asarray(a, np.float32) for a in (model.x, model.W, model.b))

    @jax.jit
    def run(mean, log_var):
      rng = jax.random.key(0)
      return (
          [estimators.elbo_terms(
              name, rng, mean, log_var, model.log_likelihood_fn, 4)["elbo"]
           for name in estimators.ESTIMATORS],
          estimators.importance_log_likelihood(
              rng, mean, log_var, model.log_likelihood_fn, 100, 30))

    elbos, estimate = run(mean, log_var)
    for elbo in elbos:
      assert elbo.dtype == jnp.float32
      assert np.all(np.isfinite(elbo))
    assert estimate.dtype == jnp.float32
    np.testing.assert_allclose(estimate, model.log_marginal(), atol=0.2)


def test_unknown_estimator_raises():
  model = MODEL
  mean, log_var = model.exact_posterior()
  with pytest.raises(ValueError, match="'C'") as info:
    estimators.elbo_terms(
        "C", jax.random.key(0), mean, log_var, model.log_likelihood_fn)
  message = str(info.value)
  assert "\n" not in message and "'A'" in message and "'B'" in message


def test_unknown_likelihood_raises():
  with pytest.raises(ValueError, match="'laplace'"):
    distributions.likelihood_log_prob(
        "laplace", jnp.zeros((2, 3)), {"mean": jnp.zeros((2, 3))})


@pytest.mark.parametrize("num_samples, chunk_size", [(0, 10), (10, 0)])
def test_importance_rejects_non_positive_sizes(num_samples, chunk_size):
  model = MODEL
  mean, log_var = model.exact_posterior()
  with pytest.raises(ValueError):
    estimators.importance_log_likelihood(
        jax.random.key(0), mean, log_var, model.log_likelihood_fn,
        num_samples=num_samples, chunk_size=chunk_size)


@pytest.mark.parametrize("num_samples", [0, -1, 2.5])
@pytest.mark.parametrize("name", ["A", "B"])
def test_estimators_reject_bad_num_samples(name, num_samples):
  model = MODEL
  mean, log_var = model.exact_posterior()
  with pytest.raises(ValueError, match="num_samples"):
    estimators.elbo_terms(name, jax.random.key(0), mean, log_var,
                          model.log_likelihood_fn, num_samples=num_samples)
