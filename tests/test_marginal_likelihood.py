"""Tests for avb.marginal_likelihood (the appendix D estimator).

The oracle model is linear-Gaussian: z ~ N(0, I_J), x | z ~ N(W z + b, s^2 I),
so p(x) = N(x; b, W W^T + s^2 I), computed with scipy. W is a generic matrix,
so the exact posterior is correlated, which a diagonal q could not match but
the full-covariance fit can.

The estimator's error has two sources, both shrinking with the number of
samples: the Gaussian fit q differs slightly from the posterior, and the
samples are correlated. Over seeds its error has a standard deviation of about
0.012 nats with the default settings (L = 1000); the tests allow 0.05.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from avb import estimators
from avb import marginal_likelihood
from avb import models

TOLERANCE = 0.05  # nats
NOISE_VAR = 0.25


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


class LinearGaussian:
  """z ~ N(0, I), x | z ~ N(W z + b, NOISE_VAR * I), with a fixed batch x."""

  def __init__(self, num_latents=2, data_dim=4, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    self.W = rng.normal(size=(data_dim, num_latents))
    self.b = rng.normal(size=data_dim)
    z = rng.normal(size=(batch, num_latents))
    self.x = (z @ self.W.T + self.b
              + np.sqrt(NOISE_VAR) * rng.normal(size=(batch, data_dim)))

  def log_likelihood_fn(self, z):
    """log p(x|z), z: [..., B, J] -> [..., B]."""
    residual = self.x - (z @ self.W.T + self.b)
    return -0.5 * jnp.sum(
        residual**2 / NOISE_VAR + np.log(2 * np.pi * NOISE_VAR), axis=-1)

  def log_joint_fn(self, z):
    return (self.log_likelihood_fn(z)
            - 0.5 * jnp.sum(z**2 + np.log(2 * np.pi), axis=-1))

  def log_marginal(self):
    cov = self.W @ self.W.T + NOISE_VAR * np.eye(len(self.b))
    return stats.multivariate_normal.logpdf(self.x, mean=self.b, cov=cov)

  def posterior(self):
    """Mean [B, J] and covariance [J, J] of p(z|x)."""
    cov = np.linalg.inv(np.eye(self.W.shape[1]) + self.W.T @ self.W / NOISE_VAR)
    return (self.x - self.b) @ self.W / NOISE_VAR @ cov, cov


MODEL = LinearGaussian()
MODEL_3D = LinearGaussian(num_latents=3, data_dim=5, batch=2, seed=1)


@jax.jit
def _appendix_d_2d(rng):
  return marginal_likelihood.appendix_d_terms(
      rng, MODEL.log_joint_fn, jnp.zeros(MODEL.x.shape[:1] + (2,)))


def test_oracle_posterior_satisfies_bayes_rule():
  mean, cov = MODEL.posterior()
  z = np.random.default_rng(2).normal(size=mean.shape)
  log_posterior = np.array([stats.multivariate_normal.logpdf(z[i], mean[i], cov)
                            for i in range(len(z))])
  np.testing.assert_allclose(
      np.asarray(MODEL.log_joint_fn(z)) - log_posterior, MODEL.log_marginal(),
      rtol=1e-12)


def test_matches_exact_log_marginal_likelihood():
  terms = _appendix_d_2d(jax.random.key(0))
  np.testing.assert_allclose(terms["log_likelihood"], MODEL.log_marginal(),
                             atol=TOLERANCE)
  # The fitted q is the posterior, and HMC ran near its target acceptance.
  mean, cov = MODEL.posterior()
  np.testing.assert_allclose(terms["fit_mean"], mean, atol=0.15)
  np.testing.assert_allclose(terms["fit_cov"],
                             np.broadcast_to(cov, terms["fit_cov"].shape),
                             atol=0.05)
  assert np.all(np.abs(np.asarray(terms["accept_prob"]) - 0.9) < 0.07)


def test_matches_exact_value_with_three_latents_and_a_bad_start():
  estimate = jax.jit(lambda rng: marginal_likelihood.appendix_d_log_likelihood(
      rng, MODEL_3D.log_joint_fn, jnp.full((2, 3), 3.0), step_size=1.0))
  log_likelihood = estimate(jax.random.key(1))
  np.testing.assert_allclose(log_likelihood, MODEL_3D.log_marginal(),
                             atol=TOLERANCE)


def test_agrees_with_importance_sampling():
  # The importance-sampled estimate with a diagonal q that covers the
  # correlated posterior (its marginals, widened) and many samples.
  mean, cov = MODEL.posterior()
  log_var = np.broadcast_to(np.log(2.0 * np.diag(cov)), mean.shape)
  importance = jax.jit(
      estimators.importance_log_likelihood, static_argnums=(3, 4, 5))(
          jax.random.key(2), jnp.asarray(mean), jnp.asarray(log_var),
          MODEL.log_likelihood_fn, 20_000, 5_000)
  appendix_d = _appendix_d_2d(jax.random.key(3))["log_likelihood"]
  np.testing.assert_allclose(importance, MODEL.log_marginal(), atol=0.02)
  np.testing.assert_allclose(appendix_d, importance, atol=TOLERANCE)


def test_tiny_vae_agrees_with_importance_sampling_from_the_prior():
  # A non-Gaussian posterior. With 2 latents and a weak decoder, importance
  # sampling from the prior with 50,000 samples is an accurate reference.
  config = models.ModelConfig(data_shape=(6,), num_latents=2, hidden_sizes=(8,),
                              likelihood="bernoulli", init="lecun")
  params = models.init_params(config, jax.random.key(4))
  x = jnp.asarray(np.random.default_rng(5).random((3, 6)) < 0.5, jnp.float32)
  appendix_d = jax.jit(lambda rng: marginal_likelihood.vae_log_likelihood(
      rng, config, params, x))(jax.random.key(6))

  @jax.jit
  def prior_importance(rng):
    z = jax.random.normal(rng, (50_000, 3, 2))
    decoded = models.Decoder(config).apply({"params": params["decoder"]}, z)
    logits = decoded["logits"]
    log_likelihood = jnp.sum(x * logits - jnp.logaddexp(0.0, logits), -1)
    return log_likelihood  # [K, B]

  log_weights = np.asarray(prior_importance(jax.random.key(7)), np.float64)
  reference = logsumexp(log_weights, axis=0) - np.log(log_weights.shape[0])
  np.testing.assert_allclose(appendix_d, reference, atol=TOLERANCE)


def test_fit_gaussian_and_log_prob_against_scipy():
  rng = np.random.default_rng(8)
  samples = rng.normal(size=(500, 2, 3)) @ np.array(
      [[1.0, 0.3, 0.0], [0.0, 0.5, 0.2], [0.0, 0.0, 0.1]])
  mean, cov = marginal_likelihood.fit_gaussian(jnp.asarray(samples))
  for i in range(2):
    np.testing.assert_allclose(mean[i], samples[:, i].mean(0), rtol=1e-10)
    np.testing.assert_allclose(cov[i], np.cov(samples[:, i].T, bias=True),
                               rtol=1e-4, atol=1e-8)
  z = rng.normal(size=(7, 2, 3))
  log_prob = marginal_likelihood.gaussian_log_prob(jnp.asarray(z), mean, cov)
  expected = np.stack([stats.multivariate_normal.logpdf(
      z[:, i], np.asarray(mean[i]), np.asarray(cov[i])) for i in range(2)], -1)
  np.testing.assert_allclose(log_prob, expected, rtol=1e-10)


def test_five_or_more_latents_are_refused():
  with pytest.raises(marginal_likelihood.LatentDimensionError,
                     match=r"fewer than 5 latents.*importance_log_likelihood"):
    marginal_likelihood.appendix_d_log_likelihood(
        jax.random.key(0), lambda z: -jnp.sum(z**2, -1), jnp.zeros((2, 5)))
  config = models.ModelConfig(data_shape=(6,), num_latents=8)
  with pytest.raises(ValueError, match="num_latents=8"):
    marginal_likelihood.vae_log_likelihood(
        jax.random.key(0), config, None, jnp.zeros((2, 6)))
  assert marginal_likelihood.check_num_latents(4) == 4
