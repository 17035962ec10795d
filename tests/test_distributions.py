"""Tests for avb.distributions: scipy.stats, closed forms and Monte Carlo.

Monte Carlo checks use a tolerance of 5 standard errors (estimated from the same
samples), so a correct implementation fails with probability well under 1e-5 per
comparison; the seeds are fixed, so the tests are deterministic anyway.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from avb import distributions

NUM_STANDARD_ERRORS = 5.0


@pytest.fixture
def x64():
  """Runs a test in float64 so comparisons with scipy can be tight."""
  with jax.enable_x64(True):
    yield


def _random_gaussian(seed: int, shape: tuple[int, ...]):
  rng = np.random.default_rng(seed)
  mean = rng.normal(size=shape)
  log_var = rng.uniform(-2.0, 1.5, size=shape)
  return mean, log_var


def test_log_2pi():
  assert distributions.LOG_2PI == pytest.approx(np.log(2 * np.pi), rel=1e-15)


def test_normal_log_prob_matches_scipy(x64):
  mean, log_var = _random_gaussian(0, (5, 7))
  x = np.random.default_rng(1).normal(size=(5, 7)) * 3.0
  got = distributions.normal_log_prob(jnp.asarray(x), mean, log_var)
  want = stats.norm.logpdf(x, loc=mean, scale=np.exp(0.5 * log_var))
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_normal_log_prob_extreme_log_var_is_finite():
  # Tiny and huge variances must not overflow to inf or NaN in float32.
  x = jnp.array([1.0, 1.0, 1.0])
  log_var = jnp.array([-80.0, 0.0, 80.0])
  got = distributions.normal_log_prob(x, jnp.zeros(3), log_var)
  assert np.all(np.isfinite(got))


def test_diag_gaussian_log_prob_matches_scipy_multivariate_normal(x64):
  mean, log_var = _random_gaussian(2, (4, 3))
  z = np.random.default_rng(3).normal(size=(6, 4, 3))  # [L, B, J]
  got = distributions.diag_gaussian_log_prob(jnp.asarray(z), mean, log_var)
  assert got.shape == (6, 4)
  want = np.array([[
      stats.multivariate_normal.logpdf(
          z[l, b], mean=mean[b], cov=np.diag(np.exp(log_var[b])))
      for b in range(4)] for l in range(6)])
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_standard_normal_log_prob_matches_scipy(x64):
  z = np.random.default_rng(4).normal(size=(5, 3)) * 2.0
  got = distributions.standard_normal_log_prob(jnp.asarray(z))
  want = stats.multivariate_normal.logpdf(z, mean=np.zeros(3), cov=np.eye(3))
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_bernoulli_log_prob_matches_scipy_for_binary_x(x64):
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(6, 10)) * 4.0
  x = (rng.uniform(size=(6, 10)) < 0.5).astype(np.float64)
  got = distributions.bernoulli_log_prob(jnp.asarray(x), logits)
  want = stats.bernoulli.logpmf(x, p=1.0 / (1.0 + np.exp(-logits)))
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_bernoulli_log_prob_is_negative_cross_entropy_for_grey_x(x64):
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(4, 9)) * 3.0
  x = rng.uniform(size=(4, 9))
  p = 1.0 / (1.0 + np.exp(-logits))
  want = x * np.log(p) + (1.0 - x) * np.log1p(-p)
  got = distributions.bernoulli_log_prob(jnp.asarray(x), logits)
  np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize("x", [0.0, 0.3, 1.0])
def test_bernoulli_log_prob_finite_for_extreme_logits(x):
  logits = jnp.array([-1e4, -100.0, 0.0, 100.0, 1e4], dtype=jnp.float32)
  xs = jnp.full_like(logits, x)
  value = distributions.bernoulli_log_prob(xs, logits)
  grad = jax.grad(
      lambda l: jnp.sum(distributions.bernoulli_log_prob(xs, l)))(logits)
  assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))
  # Exact limits: a confident correct prediction costs 0, a confident wrong
  # one costs |logit|.
  if x == 1.0:
    np.testing.assert_allclose(value[np.array([0, -1])], [-1e4, 0.0], atol=1e-3)
  if x == 0.0:
    np.testing.assert_allclose(value[np.array([0, -1])], [0.0, -1e4], atol=1e-3)


def test_likelihood_log_prob_bernoulli_sums_data_axes_with_sample_axes(x64):
  rng = np.random.default_rng(7)
  x = (rng.uniform(size=(3, 8)) < 0.5).astype(np.float64)  # [B, D]
  logits = rng.normal(size=(2, 5, 3, 8))  # [L1, L2, B, D]
  got = distributions.likelihood_log_prob(
      "bernoulli", jnp.asarray(x), {"logits": jnp.asarray(logits)})
  assert got.shape == (2, 5, 3)
  want = stats.bernoulli.logpmf(x, p=1.0 / (1.0 + np.exp(-logits))).sum(-1)
  np.testing.assert_allclose(got, want, rtol=1e-10)


def test_likelihood_log_prob_gaussian_sums_data_axes_with_sample_axes(x64):
  rng = np.random.default_rng(8)
  x = rng.uniform(size=(3, 8))  # [B, D]
  mean = 1.0 / (1.0 + np.exp(-rng.normal(size=(4, 3, 8))))  # [L, B, D]
  log_var = rng.uniform(-4.0, 0.0, size=(4, 3, 8))
  got = distributions.likelihood_log_prob(
      "gaussian", jnp.asarray(x), {"mean": mean, "log_var": log_var})
  assert got.shape == (4, 3)
  want = stats.norm.logpdf(x, loc=mean, scale=np.exp(0.5 * log_var)).sum(-1)
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_likelihood_log_prob_sums_all_trailing_data_axes(x64):
  rng = np.random.default_rng(9)
  x = rng.uniform(size=(2, 4, 5))  # [B, H, W]
  logits = rng.normal(size=(3, 2, 4, 5))  # [L, B, H, W]
  got = distributions.likelihood_log_prob("bernoulli", x, {"logits": logits})
  flat = distributions.likelihood_log_prob(
      "bernoulli", x.reshape(2, 20), {"logits": logits.reshape(3, 2, 20)})
  assert got.shape == (3, 2)
  np.testing.assert_allclose(got, flat, rtol=1e-12)


def test_likelihood_log_prob_unknown_name_raises():
  with pytest.raises(ValueError, match="'poisson'") as info:
    distributions.likelihood_log_prob(
        "poisson", jnp.zeros((2, 3)), {"logits": jnp.zeros((2, 3))})
  message = str(info.value)
  assert "\n" not in message
  for name in distributions.LIKELIHOODS:
    assert name in message


def test_likelihood_log_prob_missing_params_raises():
  with pytest.raises(ValueError, match="log_var"):
    distributions.likelihood_log_prob(
        "gaussian", jnp.zeros((2, 3)), {"mean": jnp.zeros((2, 3))})


def test_gaussian_sample_shapes():
  mean = jnp.zeros((4, 3))
  log_var = jnp.zeros((4, 3))
  rng = jax.random.key(0)
  assert distributions.gaussian_sample(rng, mean, log_var).shape == (4, 3)
  assert distributions.gaussian_sample(
      rng, mean, log_var, num_samples=7).shape == (7, 4, 3)


def test_gaussian_sample_moments():
  num_samples = 200_000
  mean = jnp.array([[0.0, -1.5, 3.0], [2.0, 0.5, -4.0]])
  log_var = jnp.array([[0.0, -2.0, 1.0], [1.5, -0.5, -3.0]])
  samples = np.asarray(distributions.gaussian_sample(
      jax.random.key(1), mean, log_var, num_samples=num_samples),
      dtype=np.float64)
  var = np.exp(np.asarray(log_var, dtype=np.float64))
  mean_error = np.sqrt(var / num_samples)
  # Standard error of the sample variance of a Gaussian: var * sqrt(2/(n-1)).
  var_error = var * np.sqrt(2.0 / (num_samples - 1))
  np.testing.assert_array_less(
      np.abs(samples.mean(0) - mean), NUM_STANDARD_ERRORS * mean_error)
  np.testing.assert_array_less(
      np.abs(samples.var(0, ddof=1) - var), NUM_STANDARD_ERRORS * var_error)


def test_gaussian_sample_gradients_flow_through_the_sample():
  mean = jnp.array([[0.3, -1.0], [2.0, 0.1]])
  log_var = jnp.array([[0.2, -1.0], [0.5, 1.0]])
  rng = jax.random.key(2)

  grad_mean = jax.grad(lambda m: jnp.sum(
      distributions.gaussian_sample(rng, m, log_var)))(mean)
  np.testing.assert_allclose(grad_mean, np.ones((2, 2)), rtol=1e-6)

  # d z / d log_var = 0.5 * exp(log_var / 2) * eps = 0.5 * (z - mean).
  z = distributions.gaussian_sample(rng, mean, log_var)
  grad_log_var = jax.grad(lambda lv: jnp.sum(
      distributions.gaussian_sample(rng, mean, lv)))(log_var)
  np.testing.assert_allclose(grad_log_var, 0.5 * (z - mean), rtol=1e-5)


def test_gaussian_sample_uses_gaussian_sample_from_noise():
  mean = jnp.array([1.0, -2.0])
  log_var = jnp.array([0.5, -1.0])
  rng = jax.random.key(3)
  noise = jax.random.normal(rng, (5, 2))
  np.testing.assert_allclose(
      distributions.gaussian_sample(rng, mean, log_var, num_samples=5),
      distributions.gaussian_sample_from_noise(noise, mean, log_var),
      rtol=1e-6)
  np.testing.assert_allclose(
      distributions.gaussian_sample_from_noise(noise, mean, log_var),
      mean + np.exp(0.5 * np.asarray(log_var)) * noise, rtol=1e-5, atol=1e-6)


def _monte_carlo_kl(mean_q, log_var_q, mean_p, log_var_p, num_samples, seed):
  """Per-element KL(q||p) by sampling q, with its standard error (numpy)."""
  rng = np.random.default_rng(seed)
  std_q = np.exp(0.5 * log_var_q)
  z = mean_q + std_q * rng.normal(size=(num_samples, *np.shape(mean_q)))
  log_ratio = (stats.norm.logpdf(z, mean_q, std_q)
               - stats.norm.logpdf(z, mean_p, np.exp(0.5 * log_var_p)))
  return log_ratio.mean(0), log_ratio.std(0, ddof=1) / np.sqrt(num_samples)


def test_kl_to_standard_normal_matches_monte_carlo(x64):
  mean, log_var = _random_gaussian(10, (2, 4))
  got = distributions.kl_to_standard_normal(mean, log_var)
  assert got.shape == (2, 4)
  estimate, standard_error = _monte_carlo_kl(
      mean, log_var, 0.0, 0.0, num_samples=200_000, seed=11)
  np.testing.assert_array_less(
      np.abs(got - estimate), NUM_STANDARD_ERRORS * standard_error + 1e-12)


def test_kl_to_standard_normal_equals_general_kl_and_closed_form(x64):
  mean, log_var = _random_gaussian(12, (3, 5))
  got = distributions.kl_to_standard_normal(mean, log_var)
  general = distributions.kl_diag_gaussians(
      mean, log_var, np.zeros_like(mean), np.zeros_like(log_var))
  closed_form = 0.5 * (mean**2 + np.exp(log_var) - 1.0 - log_var)
  np.testing.assert_allclose(got, general, rtol=1e-12)
  np.testing.assert_allclose(got, closed_form, rtol=1e-10)


def test_kl_to_standard_normal_accurate_near_the_prior():
  # At a collapsed latent (log_var ~ 0) the float32 plain form
  # exp(lv) - 1 - lv cancels badly (errors of 5-200% here); the answer is
  # ~ lv^2 / 4.
  log_var = jnp.array([1e-4, -1e-4, 1e-3], dtype=jnp.float32)
  got = distributions.kl_to_standard_normal(jnp.zeros(3), log_var)
  lv = np.asarray(log_var, dtype=np.float64)
  want = 0.5 * (np.expm1(lv) - lv)
  np.testing.assert_allclose(got, want, rtol=1e-2)


def test_kl_diag_gaussians_matches_monte_carlo(x64):
  mean_q, log_var_q = _random_gaussian(13, (6,))
  mean_p, log_var_p = _random_gaussian(14, (6,))
  got = distributions.kl_diag_gaussians(mean_q, log_var_q, mean_p, log_var_p)
  estimate, standard_error = _monte_carlo_kl(
      mean_q, log_var_q, mean_p, log_var_p, num_samples=200_000, seed=15)
  np.testing.assert_array_less(
      np.abs(got - estimate), NUM_STANDARD_ERRORS * standard_error + 1e-12)


def test_kl_diag_gaussians_zero_iff_equal_and_non_negative(x64):
  mean, log_var = _random_gaussian(16, (50,))
  np.testing.assert_allclose(
      distributions.kl_diag_gaussians(mean, log_var, mean, log_var), 0.0,
      atol=1e-15)
  mean_q, log_var_q = _random_gaussian(17, (10_000,))
  mean_p, log_var_p = _random_gaussian(18, (10_000,))
  kl = np.asarray(
      distributions.kl_diag_gaussians(mean_q, log_var_q, mean_p, log_var_p))
  assert np.all(kl >= 0.0)
  assert np.all(kl > 0.0)  # no two random pairs coincide


def test_kl_diag_gaussians_finite_for_extreme_variances():
  kl = distributions.kl_diag_gaussians(
      jnp.array([0.0, 1.0]), jnp.array([-60.0, 60.0]),
      jnp.array([0.0, 1.0]), jnp.array([-60.0, 60.0]))
  np.testing.assert_allclose(kl, [0.0, 0.0], atol=1e-6)
