"""Tests for avb.wake_sleep: which phase reaches which parameters, and learning.

The oracles for the gradients are written out here from flax's Encoder and
Decoder modules and a hand-written Bernoulli log-likelihood, at samples drawn
by hand from the same keys; they share no code path with wake_sleep_loss
beyond the network modules themselves.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from avb import models
from avb import train
from avb import wake_sleep

NUM_STANDARD_ERRORS = 5.0
CONFIG = models.ModelConfig(data_shape=(6,), num_latents=2, hidden_sizes=(8,),
                            likelihood="bernoulli", init="lecun")


@functools.cache
def _params(seed=0, config=CONFIG):
  return jax.jit(models.init_params, static_argnums=0)(
      config, jax.random.key(seed))


def _data(num=5, dim=6, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.random((num, dim)) < 0.5, jnp.float32)


def _bernoulli_log_likelihood(x, logits):
  return jnp.sum(x * logits - jnp.logaddexp(0.0, logits), axis=-1)


def _tree_allclose(a, b, **kwargs):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **kwargs), a, b)


def _all_zero(tree):
  return all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(tree))


# Everything model-sized is jitted (eager flax calls dispatch op by op), and
# every call passes the same arguments as traced values so that one
# compilation serves all tests.
_loss = jax.jit(wake_sleep.wake_sleep_loss, static_argnums=(3, 4))
_loss_grad = jax.jit(
    jax.grad(wake_sleep.wake_sleep_loss, has_aux=True), static_argnums=(3, 4))
NUM_DREAMS = 7


@jax.jit
def _oracle_grads(params, x, rng):
  """The wake and sleep gradients written out from their definitions."""
  wake_rng, sleep_rng = jax.random.split(rng)

  # Wake: z from q(z|x) with the wake key, then the decoder gradient of
  # -mean log p(x, z) at that fixed z.
  mean, log_var = models.Encoder(CONFIG).apply(
      {"params": params["encoder"]}, x)
  z = mean + jnp.exp(0.5 * log_var) * jax.random.normal(wake_rng, mean.shape)

  def wake_oracle(decoder_params):
    logits = models.Decoder(CONFIG).apply({"params": decoder_params},
                                          z)["logits"]
    return -jnp.mean(_bernoulli_log_likelihood(x, logits)
                     - 0.5 * jnp.sum(z**2 + np.log(2 * np.pi), axis=-1))

  # Sleep: the dreams from the sleep key, then the encoder gradient of
  # -mean log q(z_dream | x_dream) with the dreams fixed.
  z_dream, x_dream = wake_sleep.sample_dreams(sleep_rng, CONFIG, params,
                                              NUM_DREAMS)

  def sleep_oracle(encoder_params):
    mean, log_var = models.Encoder(CONFIG).apply({"params": encoder_params},
                                                 x_dream)
    return -jnp.mean(jnp.sum(
        -0.5 * (np.log(2 * np.pi) + log_var
                + (z_dream - mean)**2 * jnp.exp(-log_var)), axis=-1))

  return {"decoder": jax.grad(wake_oracle)(params["decoder"]),
          "encoder": jax.grad(sleep_oracle)(params["encoder"])}, x_dream


def test_one_gradient_gives_wake_to_decoder_and_sleep_to_encoder():
  params, x, rng = _params(), _data(), jax.random.key(1)
  grads, _ = _loss_grad(params, x, rng, CONFIG, NUM_DREAMS)
  oracle, x_dream = _oracle_grads(params, x, rng)
  assert x_dream.shape == (NUM_DREAMS, 6)
  _tree_allclose(grads["decoder"], oracle["decoder"], rtol=1e-5, atol=1e-7)
  _tree_allclose(grads["encoder"], oracle["encoder"], rtol=1e-5, atol=1e-7)


@jax.jit
def _phase_grads(params, x, rng):
  wake_rng, sleep_rng = jax.random.split(rng)
  wake = jax.grad(lambda p: -jnp.mean(wake_sleep.wake_terms(
      p, x, wake_rng, CONFIG)["log_joint"]))(params)
  sleep = jax.grad(lambda p: -jnp.mean(wake_sleep.sleep_terms(
      p, sleep_rng, CONFIG, 9)["log_posterior"]))(params)
  return wake, sleep


def test_each_phase_touches_only_its_own_parameters():
  wake_grads, sleep_grads = _phase_grads(_params(), _data(), jax.random.key(2))
  assert _all_zero(wake_grads["encoder"])
  assert not _all_zero(wake_grads["decoder"])
  assert _all_zero(sleep_grads["decoder"])
  assert not _all_zero(sleep_grads["encoder"])


def test_weight_prior_and_elbo_metric():
  params, x, rng = _params(), _data(), jax.random.key(3)
  plain, metrics = _loss(params, x, rng, CONFIG, 4, weight_prior_std=0.0,
                         num_train=1)
  with_prior, _ = _loss(params, x, rng, CONFIG, 4, weight_prior_std=2.0,
                        num_train=50)
  # The prior enters as in AEVB: log N(theta; 0, s^2 I) / N.
  np.testing.assert_allclose(
      with_prior - plain, -train.weight_log_prior(params, 2.0) / 50, rtol=1e-5)
  # The ELBO metric is estimator B with L=1 at the wake sample.
  wake_rng, _ = jax.random.split(rng)
  terms = jax.jit(train.elbo_terms, static_argnums=(0, 4, 5))(
      CONFIG, params, x, wake_rng, "B", 1)
  np.testing.assert_allclose(metrics["elbo"], jnp.mean(terms["elbo"]),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["elbo"],
                             metrics["reconstruction"] - metrics["kl"],
                             rtol=1e-6)


def test_bernoulli_dreams_have_the_decoder_probabilities():
  logits = jnp.array([-3.0, -0.5, 0.0, 2.0, 60.0, -60.0])
  draws = wake_sleep.sample_likelihood(
      jax.random.key(5), "bernoulli", {"logits": jnp.broadcast_to(
          logits, (20_000, 6))})
  assert set(np.unique(np.asarray(draws))) <= {0.0, 1.0}
  p = jax.nn.sigmoid(logits)
  se = np.sqrt(np.maximum(p * (1 - p), 1e-12) / draws.shape[0])
  assert np.all(np.abs(draws.mean(0) - p) <= NUM_STANDARD_ERRORS * se + 1e-12)


def test_gaussian_dreams_have_the_decoder_mean_and_variance():
  mean = jnp.array([0.1, 0.5, 0.9])
  log_var = jnp.array([-4.0, -1.0, 0.5])
  shape = (20_000, 3)
  draws = wake_sleep.sample_likelihood(
      jax.random.key(6), "gaussian",
      {"mean": jnp.broadcast_to(mean, shape),
       "log_var": jnp.broadcast_to(log_var, shape)})
  standardized = (draws - mean) * jnp.exp(-0.5 * log_var)
  n = draws.shape[0]
  assert np.all(np.abs(standardized.mean(0)) < NUM_STANDARD_ERRORS / np.sqrt(n))
  assert np.all(np.abs(standardized.var(0) - 1.0)
                < NUM_STANDARD_ERRORS * np.sqrt(2.0 / n))


def test_gaussian_likelihood_model_runs():
  config = models.ModelConfig(data_shape=(6,), num_latents=2,
                              hidden_sizes=(8,), likelihood="gaussian")
  params = _params(config=config)
  loss, metrics = jax.jit(wake_sleep.wake_sleep_loss, static_argnums=(3, 4))(
      params, _data(), jax.random.key(7), config, 3)
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(v)).all() for v in metrics.values())
  with pytest.raises(ValueError, match="Unknown likelihood"):
    wake_sleep.sample_likelihood(jax.random.key(0), "poisson", {})


def _synthetic_data():
  """64 binary vectors of length 8: two prototypes with 5% of bits flipped."""
  rng = np.random.default_rng(8)
  prototypes = np.array([[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0, 1]])
  x = prototypes[rng.integers(0, 2, 64)]
  flips = rng.random(x.shape) < 0.05
  return np.where(flips, 1 - x, x).astype(np.float32)


def test_wake_sleep_training_increases_the_elbo():
  model_config = models.ModelConfig(data_shape=(8,), num_latents=2,
                                    hidden_sizes=(16,), likelihood="bernoulli",
                                    init="lecun")
  config = ml_collections.ConfigDict({
      "data": {"dynamic_binarization": False},
      "objective": {"weight_prior_std": 1.0}})
  tx = optax.adam(0.02)
  state = jax.jit(train.create_train_state, static_argnums=(0, 1))(
      model_config, tx, 9)
  step = wake_sleep.make_wake_sleep_train_step(model_config, config, tx,
                                               num_train=64)
  x = jnp.asarray(_synthetic_data())

  def elbo(params):
    return jnp.mean(train.elbo_terms(model_config, params, x,
                                     jax.random.key(10), "B", 50)["elbo"])

  @jax.jit
  def run(state):
    def body(state, _):
      state, metrics = step(state, {"image": x})
      return state, metrics["elbo"]
    before = elbo(state.params)
    state, history = jax.lax.scan(body, state, None, length=200)
    return state, history, before, elbo(state.params)

  state, history, before, after = run(state)
  before, after = float(before), float(after)
  assert int(state.step) == 200 and int(state.bad_step) == -1
  assert np.all(np.isfinite(np.asarray(history)))
  # It starts near -6 nats (about 8 log 2, coin flips); two noisy prototypes
  # need about 1 bit plus the flips, and 200 steps reach about -2.
  assert after > before + 1.5, (before, after)
