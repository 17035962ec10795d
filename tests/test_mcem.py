"""Tests for avb.mcem: the E-step is the tested HMC kernel, the M-step ascends
log p(x, z) at fixed z, the annealed Adagrad follows its formula, and the
persistent chains are kept per datapoint."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from avb import hmc
from avb import mcem
from avb import models

CONFIG = models.ModelConfig(data_shape=(6,), num_latents=2, hidden_sizes=(8,),
                            likelihood="bernoulli", init="lecun")


def _decoder_params(seed=0):
  return models.init_params(CONFIG, jax.random.key(seed))["decoder"]


def _data(num=8, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.random((num, 6)) < 0.5, jnp.float32)


def _prototype_data(num, seed):
  """Two prototypes with 5% of bits flipped: structure a decoder can learn."""
  rng = np.random.default_rng(seed)
  prototypes = np.array([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
  x = prototypes[rng.integers(0, 2, num)]
  return jnp.asarray(np.where(rng.random(x.shape) < 0.05, 1 - x, x),
                     jnp.float32)


def test_e_step_is_one_adapted_hmc_transition():
  params, x = _decoder_params(), _data()
  z = jax.random.normal(jax.random.key(1), (8, 2))
  step_size = jnp.linspace(0.05, 0.5, 8)
  rng = jax.random.key(2)
  new_z, new_step_size, info = jax.jit(functools.partial(
      mcem.e_step, model_config=CONFIG))(rng, params, x, z, step_size)

  log_joint_fn = mcem.decoder_log_joint_fn(CONFIG, params, x)
  expected_z, expected_info = jax.jit(hmc.hmc_step, static_argnums=(2, 4))(
      jax.random.fold_in(rng, 0), z, log_joint_fn, step_size, 10)
  # Two separately compiled float32 programs: equal up to a few ulps of
  # rounding (10 leapfrog steps), hence the atol for entries near zero.
  np.testing.assert_allclose(new_z, expected_z, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(info["accept_prob"], expected_info["accept_prob"],
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
      new_step_size,
      hmc.adapt_step_size(step_size, expected_info["accept_prob"], 0.9, 0.5),
      rtol=1e-6)
  # The log-joint it samples is log p(x|z) + log p(z), written out here.
  @jax.jit
  def by_hand(z):
    logits = models.Decoder(CONFIG).apply({"params": params}, z)["logits"]
    return (jnp.sum(x * logits - jnp.logaddexp(0.0, logits), -1)
            - 0.5 * jnp.sum(z**2 + np.log(2 * np.pi), -1))
  np.testing.assert_allclose(jax.jit(log_joint_fn)(z), by_hand(z), rtol=1e-5)


def test_m_step_increases_log_joint_at_fixed_z():
  params, x = _decoder_params(), _data()
  z = jax.random.normal(jax.random.key(3), (8, 2))
  tx = mcem.annealed_adagrad(0.05, 100.0)
  m_step = jax.jit(functools.partial(mcem.m_step, model_config=CONFIG, tx=tx))
  new_params, _, metrics = m_step(params, tx.init(params), x, z)
  log_joint = jax.jit(lambda p: jnp.mean(
      mcem.decoder_log_joint_fn(CONFIG, p, x)(z)))
  np.testing.assert_allclose(metrics["log_joint_before"], log_joint(params),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["log_joint_after"], log_joint(new_params),
                             rtol=1e-5)
  assert float(log_joint(new_params)) > float(log_joint(params)) + 0.01


def test_annealed_adagrad_follows_its_schedule():
  # With a constant gradient g, Adagrad's k-th update (k from 0) is
  # -lr_k * g / sqrt((k + 1) g^2) with lr_k = lr_0 / (1 + k / tau).
  tx = mcem.annealed_adagrad(0.1, 4.0)
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.array([2.0, -0.5, 1.0])}
  state = tx.init(params)
  for k in range(6):
    updates, state = tx.update(grads, state, params)
    expected = -0.1 / (1 + k / 4.0) * np.sign(grads["w"]) / np.sqrt(k + 1)
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-5)


def test_mcem_steps_keep_chains_per_datapoint_and_fit_the_data():
  num_train = 16
  x_all = _prototype_data(num_train, seed=4)
  tx = mcem.annealed_adagrad(0.1, 500.0)
  state = mcem.create_mcem_state(CONFIG, tx, jax.random.key(5), num_train)
  step = jax.jit(functools.partial(mcem.mcem_step, model_config=CONFIG, tx=tx,
                                   num_train=num_train, weight_prior_std=1.0))

  # One step on the first half leaves the other half's chains alone.
  first = jnp.arange(8)
  new_state, _ = step(state, x_all[first], first, jax.random.key(6))
  np.testing.assert_array_equal(new_state.chain_z[8:], state.chain_z[8:])
  np.testing.assert_array_equal(new_state.step_size[8:], state.step_size[8:])
  assert not np.array_equal(new_state.chain_z[:8], state.chain_z[:8])

  @jax.jit
  def run(state):
    def body(state, t):
      indices = jnp.where(t % 2 == 0, first, first + 8)
      state, metrics = step(state, x_all[indices], indices,
                            jax.random.fold_in(jax.random.key(7), t))
      return state, metrics
    return jax.lax.scan(body, state, jnp.arange(200))

  state, metrics = run(state)
  log_joint = np.asarray(metrics["log_joint"])
  assert int(state.step) == 200
  assert np.all(np.isfinite(log_joint))
  # log p(x, z) at the chains rises as the decoder learns the data: from
  # about -7 nats to about -4 (noisy, as z is a single posterior sample).
  assert log_joint[-50:].mean() > log_joint[0] + 1.5
  # Step sizes were tuned towards 90% acceptance.
  assert abs(np.asarray(metrics["accept_prob"])[-50:].mean() - 0.9) < 0.1


def test_make_mcem_train_step_runs():
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({
      "seed": 0, "data": {"dynamic_binarization": True},
      "objective": {"weight_prior_std": 1.0}})
  tx = optax.adagrad(0.01)
  state = mcem.create_mcem_state(CONFIG, tx, jax.random.key(8), 8)
  train_step = jax.jit(mcem.make_mcem_train_step(CONFIG, config, tx, 8))
  batch = {"image": np.random.default_rng(9).random((4, 6)).astype(np.float32),
           "index": jnp.array([0, 2, 4, 6])}
  state, metrics = train_step(state, batch)
  assert int(state.step) == 1
  assert np.isfinite(float(metrics["loss"]))
