"""Tests for avb.estimators on a linear-Gaussian model with a closed-form log p(x).

The model is z ~ N(0, I_J), x | z ~ N(W z + b, s^2 I_D), so x ~ N(b, W W^T + s^2 I)
and, for a diagonal q, the ELBO is available in closed form. W has orthogonal
columns, which makes the exact posterior diagonal, so a diagonal-Gaussian q can
equal it. The oracles (scipy's multivariate normal, the closed-form ELBO, a
hand-written decoder log-likelihood) use no avb code.

Monte Carlo checks allow 5 standard errors estimated from the same samples;
seeds are fixed, so the tests are deterministic.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from avb import distributions
from avb import estimators

NUM_STANDARD_ERRORS = 5.0
NUM_LATENTS = 2
NUM_DATA = 4
BATCH = 3
NOISE_VAR = 0.25


@pytest.fixture(autouse=True)
def x64():
  """Runs every test in float64: closed-form comparisons need the precision."""
  with jax.enable_x64(True):
    yield


class LinearGaussian:
  """z ~ N(0, I), x | z ~ N(W z + b, NOISE_VAR * I), with a fixed batch x."""

  def __init__(self, seed: int = 0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(NUM_DATA, NUM_LATENTS)))
    self.W = q * np.array([1.5, 0.8])  # [D, J], orthogonal columns
    self.b = rng.normal(size=NUM_DATA)  # [D]
    z = rng.normal(size=(BATCH, NUM_LATENTS))
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
    mean, log_var = self.exact_posterior()
    return mean + np.array([0.6, -0.4]), log_var + np.array([0.8, -0.5])

  def closed_form_elbo(self, mean, log_var) -> np.ndarray:
    """E_q[log p(x|z)] - KL(q || p(z)) for q = N(mean, diag(exp(log_var)))."""
    var = np.exp(log_var)
    residual = self.x - (mean @ self.W.T + self.b)  # [B, D]
    expected_log_likelihood = -0.5 * (
        NUM_DATA * np.log(2 * np.pi * NOISE_VAR)
        + (np.sum(residual**2, -1) + var @ np.sum(self.W**2, 0)) / NOISE_VAR)
    kl = 0.5 * np.sum(mean**2 + var - 1.0 - log_var, axis=-1)
    return expected_log_likelihood - kl


def _elbo_draws(estimator, model, mean, log_var, num_draws, seed=0):
  """num_draws independent single-sample ELBO estimates, [num_draws, B]."""
  rngs = jax.random.split(jax.random.key(seed), num_draws)
  draw = lambda rng: estimator(
      rng, mean, log_var, model.log_likelihood_fn, num_samples=1)["elbo"]
  return np.asarray(jax.jit(jax.vmap(draw))(rngs))


def test_oracle_exact_posterior_satisfies_bayes_rule():
  # Guards the test's own algebra: log p(x) = log p(x|z) + log p(z) - log p(z|x)
  # at any z.
  model = LinearGaussian()
  mean, log_var = model.exact_posterior()
  z = np.random.default_rng(1).normal(size=(1, BATCH, NUM_LATENTS))
  log_joint = (np.asarray(model.log_likelihood_fn(z))[0]
               + stats.norm.logpdf(z[0]).sum(-1))
  log_posterior = stats.norm.logpdf(
      z[0], mean, np.exp(0.5 * log_var)).sum(-1)
  np.testing.assert_allclose(
      log_joint - log_posterior, model.log_marginal(), rtol=1e-12)
  np.testing.assert_allclose(
      model.closed_form_elbo(mean, log_var), model.log_marginal(), rtol=1e-12)


@pytest.mark.parametrize("estimator", [estimators.sgvb_a, estimators.sgvb_b])
def test_estimator_is_unbiased_for_closed_form_elbo(estimator):
  model = LinearGaussian()
  mean, log_var = model.mismatched_posterior()
  draws = _elbo_draws(estimator, model, mean, log_var, num_draws=20_000)
  standard_error = draws.std(0, ddof=1) / np.sqrt(draws.shape[0])
  np.testing.assert_array_less(
      np.abs(draws.mean(0) - model.closed_form_elbo(mean, log_var)),
      NUM_STANDARD_ERRORS * standard_error)


def test_estimators_a_and_b_agree_and_b_has_lower_variance():
  model = LinearGaussian()
  mean, log_var = model.mismatched_posterior()
  draws_a = _elbo_draws(estimators.sgvb_a, model, mean, log_var, 20_000, seed=1)
  draws_b = _elbo_draws(estimators.sgvb_b, model, mean, log_var, 20_000, seed=2)
  n = draws_a.shape[0]
  standard_error = np.sqrt((draws_a.var(0) + draws_b.var(0)) / n)
  np.testing.assert_array_less(
      np.abs(draws_a.mean(0) - draws_b.mean(0)),
      NUM_STANDARD_ERRORS * standard_error)
  assert np.mean(draws_b.var(0)) < np.mean(draws_a.var(0))


@pytest.mark.parametrize("name", ["A", "B"])
def test_estimator_terms_are_consistent(name):
  model = LinearGaussian()
  mean, log_var = model.mismatched_posterior()
  rng = jax.random.key(3)
  terms = estimators.elbo_terms(
      name, rng, mean, log_var, model.log_likelihood_fn, num_samples=5)
  assert terms["elbo"].shape == (BATCH,)
  assert terms["reconstruction"].shape == (BATCH,)
  assert terms["kl"].shape == (BATCH,)
  assert terms["kl_per_latent"].shape == (BATCH, NUM_LATENTS)
  assert terms["z"].shape == (5, BATCH, NUM_LATENTS)
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
  model = LinearGaussian()
  mean, log_var = model.mismatched_posterior()
  terms = estimators.sgvb_a(
      jax.random.key(4), mean, log_var, model.log_likelihood_fn, num_samples=7)
  z = np.asarray(terms["z"])
  log_ratio = (stats.norm.logpdf(z, mean, np.exp(0.5 * log_var)).sum(-1)
               - stats.norm.logpdf(z).sum(-1))  # [L, B]
  np.testing.assert_allclose(terms["kl"], log_ratio.mean(0), rtol=1e-10)
  terms_b = estimators.sgvb_b(
      jax.random.key(4), mean, log_var, model.log_likelihood_fn, num_samples=7)
  np.testing.assert_allclose(
      terms_b["kl"], np.sum(terms["kl_per_latent"], -1), rtol=1e-12)


def test_exact_posterior_gives_log_marginal_with_zero_variance():
  model = LinearGaussian()
  mean, log_var = model.exact_posterior()
  log_marginal = model.log_marginal()
  # Estimator A: every single sample equals log p(x).
  draws_a = _elbo_draws(estimators.sgvb_a, model, mean, log_var, 100)
  np.testing.assert_allclose(
      draws_a, np.broadcast_to(log_marginal, draws_a.shape), rtol=1e-10)
  # Estimator B is still noisy (its terms are not the log-ratio), but unbiased.
  draws_b = _elbo_draws(estimators.sgvb_b, model, mean, log_var, 20_000)
  assert np.all(draws_b.std(0) > 1e-3)
  np.testing.assert_array_less(
      np.abs(draws_b.mean(0) - log_marginal),
      NUM_STANDARD_ERRORS * draws_b.std(0, ddof=1) / np.sqrt(20_000))
  for num_samples in (1, 7, 100):
    estimate = estimators.importance_log_likelihood(
        jax.random.key(5), mean, log_var, model.log_likelihood_fn,
        num_samples=num_samples, chunk_size=3)
    np.testing.assert_allclose(estimate, log_marginal, rtol=1e-10)


def test_importance_estimate_tightens_with_num_samples():
  model = LinearGaussian()
  mean, log_var = model.mismatched_posterior()
  log_marginal = model.log_marginal()
  elbo = model.closed_form_elbo(mean, log_var)
  assert np.all(log_marginal - elbo > 0.5)  # a clearly loose q
  num_seeds = 200
  rngs = jax.random.split(jax.random.key(6), num_seeds)
  means, errors = [], []
  for num_samples in (1, 10, 100, 1000):
    estimate = jax.jit(jax.vmap(
        lambda rng: estimators.importance_log_likelihood(
            rng, mean, log_var, model.log_likelihood_fn,
            num_samples=num_samples, chunk_size=250)))(rngs)  # [S, B]
    estimate = np.asarray(estimate).mean(-1)  # [S], averaged over the batch
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


@pytest.mark.parametrize("chunk_size", [1000, 2000, 250, 300, 7, 1])
def test_chunked_importance_equals_unchunked(chunk_size):
  model = LinearGaussian()
  mean, log_var = model.mismatched_posterior()
  rng = jax.random.key(7)
  num_samples = 1000
  estimate = estimators.importance_log_likelihood(
      rng, mean, log_var, model.log_likelihood_fn, num_samples=num_samples,
      chunk_size=chunk_size)
  unchunked = estimators.importance_log_likelihood(
      rng, mean, log_var, model.log_likelihood_fn, num_samples=num_samples,
      chunk_size=num_samples)
  np.testing.assert_allclose(estimate, unchunked, rtol=1e-12)
  np.testing.assert_allclose(
      estimate, _reference_importance(rng, mean, log_var, model, num_samples),
      rtol=1e-12)


def test_importance_with_many_samples_keeps_decoder_calls_small():
  model = LinearGaussian()
  mean, log_var = model.mismatched_posterior()
  seen_sample_counts = []

  def log_likelihood_fn(z):
    seen_sample_counts.append(z.shape[0])  # runs at trace time
    return model.log_likelihood_fn(z)

  estimate_fn = jax.jit(
      estimators.importance_log_likelihood, static_argnums=(3, 4, 5))
  estimate = estimate_fn(
      jax.random.key(8), mean, log_var, log_likelihood_fn, 5000, 64)
  # 5000 = 78 * 64 + 8: one traced call for the scanned chunks, one for the rest.
  assert seen_sample_counts == [64, 8]
  assert np.all(np.isfinite(estimate))
  np.testing.assert_allclose(estimate, model.log_marginal(), atol=0.05)


def _flat_finite_difference_check(fn, args, eps=1e-6):
  """Compares jax.grad of fn(*args) with central differences, arg by arg."""
  grads = jax.grad(fn, argnums=tuple(range(len(args))))(*args)
  for index, (arg, grad) in enumerate(zip(args, grads)):
    arg = np.asarray(arg, dtype=np.float64)
    numeric = np.zeros_like(arg)
    for flat in range(arg.size):
      step = np.zeros(arg.size)
      step[flat] = eps
      step = step.reshape(arg.shape)
      plus = list(args)
      minus = list(args)
      plus[index] = arg + step
      minus[index] = arg - step
      numeric.flat[flat] = (fn(*plus) - fn(*minus)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["A", "B", "importance"])
def test_gradient_matches_finite_differences(name):
  model = LinearGaussian()
  mean, log_var = model.mismatched_posterior()
  rng = jax.random.key(9)

  def objective(mean, log_var, weight):
    def log_likelihood_fn(z):
      residual = model.x - (z @ weight.T + model.b)
      return -0.5 * jnp.sum(
          residual**2 / NOISE_VAR + np.log(2 * np.pi * NOISE_VAR), axis=-1)
    if name == "importance":
      value = estimators.importance_log_likelihood(
          rng, mean, log_var, log_likelihood_fn, num_samples=10, chunk_size=4)
    else:
      value = estimators.elbo_terms(
          name, rng, mean, log_var, log_likelihood_fn, num_samples=3)["elbo"]
    return jnp.sum(value)

  _flat_finite_difference_check(
      jax.jit(objective), (jnp.asarray(mean), jnp.asarray(log_var),
                           jnp.asarray(model.W)))


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
  grads = estimators.per_example_grads(_bernoulli_vae_loss, params, x, rngs)
  for i in range(batch):
    loop_grad = jax.grad(_bernoulli_vae_loss)(params, x[i], rngs[i])
    for key in params:
      assert grads[key].shape == (batch, *params[key].shape)
      np.testing.assert_allclose(grads[key][i], loop_grad[key], rtol=1e-10)
  # Different examples really get different gradients.
  assert not np.allclose(grads["decoder"][0], grads["decoder"][1])
  # Their mean is the gradient of the mean loss.
  mean_loss = lambda p: jnp.mean(
      jax.vmap(_bernoulli_vae_loss, in_axes=(None, 0, 0))(p, x, rngs))
  mean_grad = jax.grad(mean_loss)(params)
  for key in params:
    np.testing.assert_allclose(
        grads[key].mean(0), mean_grad[key], rtol=1e-10, atol=1e-12)


def test_estimators_run_in_float32_under_jit():
  with jax.enable_x64(False):
    model = LinearGaussian()
    mean, log_var = (jnp.asarray(a, jnp.float32)
                     for a in model.mismatched_posterior())
    model.x = np.asarray(model.x, np.float32)
    model.W = np.asarray(model.W, np.float32)
    model.b = np.asarray(model.b, np.float32)
    for name in estimators.ESTIMATORS:
      terms = jax.jit(
          lambda m, lv: estimators.elbo_terms(
              name, jax.random.key(0), m, lv, model.log_likelihood_fn, 4))(
                  mean, log_var)
      assert terms["elbo"].dtype == jnp.float32
      assert np.all(np.isfinite(terms["elbo"]))
    estimate = estimators.importance_log_likelihood(
        jax.random.key(0), mean, log_var, model.log_likelihood_fn, 100, 30)
    assert estimate.dtype == jnp.float32
    np.testing.assert_allclose(estimate, model.log_marginal(), atol=0.2)


def test_unknown_estimator_raises():
  model = LinearGaussian()
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
  model = LinearGaussian()
  mean, log_var = model.exact_posterior()
  with pytest.raises(ValueError):
    estimators.importance_log_likelihood(
        jax.random.key(0), mean, log_var, model.log_likelihood_fn,
        num_samples=num_samples, chunk_size=chunk_size)
