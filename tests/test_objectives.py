"""Tests for avb/objectives.py: beta-VAE and capacity losses, C schedule, resume."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from avb import config_utils
from avb import models
from avb import objectives
from avb import train

CONFIG = models.ModelConfig(data_shape=(4, 5), num_latents=3, hidden_sizes=(8,),
                            activation="tanh", init="lecun")
X = (jax.random.uniform(jax.random.key(7), (6, 20)) > 0.5).astype(jnp.float32)


def _params(seed=0):
  return models.init_params(CONFIG, jax.random.key(seed))


def _oracle_terms(params, x, rng):
  """-log p(x|z) summed over pixels and KL per latent, written out by hand."""
  model = models.VAE(CONFIG)
  mean, log_var = model.apply({"params": params}, x, method=models.VAE.encode)
  # Estimator B draws z = mean + exp(log_var / 2) * eps with eps from rng.
  eps = jax.random.normal(rng, (1, *mean.shape))
  z = mean + jnp.exp(0.5 * log_var) * eps
  logits = np.asarray(model.apply({"params": params}, z,
                                  method=models.VAE.decode)["logits"][0], np.float64)
  xs = np.asarray(x, np.float64)
  # Bernoulli: -[x log s(l) + (1 - x) log(1 - s(l))], stable form.
  nll = np.sum(np.maximum(logits, 0) - logits * xs + np.log1p(np.exp(-np.abs(logits))),
               axis=1)
  mean, log_var = np.asarray(mean, np.float64), np.asarray(log_var, np.float64)
  kl = 0.5 * (np.exp(log_var) + mean**2 - 1 - log_var)  # [B, J]
  return nll, kl


def test_beta_one_is_the_negative_elbo_and_matches_a_hand_oracle():
  params, rng = _params(), jax.random.key(3)
  loss, metrics = objectives.beta_vae_loss(CONFIG)(params, X, rng,
                                                   {"beta": jnp.float32(1.0)})
  terms = train.elbo_terms(CONFIG, params, X, rng, "B", 1)
  np.testing.assert_allclose(loss, -jnp.mean(terms["elbo"]), rtol=1e-6)
  np.testing.assert_allclose(metrics["elbo"], -loss, rtol=1e-6)
  nll, kl = _oracle_terms(params, X, rng)
  np.testing.assert_allclose(metrics["reconstruction"], nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["kl"], kl.sum(1).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["kl_per_latent"], kl.mean(0), rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(loss, nll.mean() + kl.sum(1).mean(), rtol=1e-5)


def test_beta_weights_the_kl_and_normalised_beta_is_reported():
  params, rng = _params(), jax.random.key(3)
  loss_fn = objectives.beta_vae_loss(CONFIG)
  loss4, metrics = loss_fn(params, X, rng, {"beta": jnp.float32(4.0)})
  np.testing.assert_allclose(
      loss4, metrics["reconstruction"] + 4.0 * metrics["kl"], rtol=1e-6)
  # Higgins et al.: beta_norm = beta * J / D = 4 * 3 / 20.
  np.testing.assert_allclose(metrics["normalised_beta"], 0.6, rtol=1e-6)
  assert metrics["kl_per_latent"].shape == (3,)
  loss0, _ = loss_fn(params, X, rng, {"beta": jnp.float32(0.0)})
  np.testing.assert_allclose(loss0, metrics["reconstruction"], rtol=1e-6)


@pytest.mark.parametrize("step,expected", [
    (0, 0.0), (1, 0.25), (50, 12.5), (99, 24.75), (100, 25.0), (101, 25.0),
    (10**6, 25.0)])
def test_capacity_schedule_is_linear_then_held(step, expected):
  value = objectives.capacity_schedule(step, 25.0, 100)
  np.testing.assert_allclose(value, expected, rtol=1e-6)


def test_capacity_schedule_vectorises_over_steps_and_runs():
  steps = jnp.arange(0, 8, dtype=jnp.int32)
  np.testing.assert_allclose(objectives.capacity_schedule(steps, 2.0, 4),
                             [0, 0.5, 1, 1.5, 2, 2, 2, 2])
  np.testing.assert_allclose(
      objectives.capacity_schedule(jnp.array([2, 2]), jnp.array([4.0, 8.0]), 4),
      [2.0, 4.0])


def test_capacity_loss_value_and_gradient_sign_flips_around_c():
  params, rng = _params(), jax.random.key(5)
  loss_fn = objectives.capacity_loss(CONFIG, capacity_steps=10)
  gamma = 100.0

  def at(capacity_max):
    hyper = {"gamma": jnp.float32(gamma), "capacity_max": jnp.float32(capacity_max),
             objectives.STEP_KEY: jnp.int32(10)}  # step 10: C = C_max
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: loss_fn(p, X, rng, hyper), has_aux=True)(params)
    return loss, metrics, grads

  _, metrics, _ = at(0.0)
  kl = float(metrics["kl"])
  assert kl > 0
  loss_below, below, grads_below = at(0.5 * kl)   # C < KL
  loss_above, above, grads_above = at(2.0 * kl)   # C > KL
  np.testing.assert_allclose(below["capacity"], 0.5 * kl, rtol=1e-6)
  for loss, terms in ((loss_below, below), (loss_above, above)):
    np.testing.assert_allclose(
        loss, terms["reconstruction"] + gamma * abs(terms["kl"] - terms["capacity"]),
        rtol=1e-5)
  # d/dtheta gamma |KL - C| = gamma sign(KL - C) dKL/dtheta: the KL part of
  # the gradient is the same vector with opposite signs on the two sides of C.
  _, grads_reconstruction = jax.value_and_grad(
      lambda p: objectives.beta_vae_loss(CONFIG)(p, X, rng, {"beta": 0.0})[0])(params)
  kl_part_below = jax.tree.map(jnp.subtract, grads_below, grads_reconstruction)
  kl_part_above = jax.tree.map(jnp.subtract, grads_above, grads_reconstruction)
  for b, a in zip(jax.tree.leaves(kl_part_below), jax.tree.leaves(kl_part_above)):
    np.testing.assert_allclose(b, -a, rtol=1e-3, atol=1e-3)
  bias_below = np.asarray(kl_part_below["encoder"]["log_var"]["bias"])
  assert np.abs(bias_below).max() > 1e-2  # the flip is not between zeros
  # The decoder does not touch the KL: its gradient is the reconstruction's.
  for b in jax.tree.leaves(kl_part_below["decoder"]):
    np.testing.assert_allclose(b, 0.0, atol=1e-4)


def test_capacity_loss_needs_the_step():
  with pytest.raises(KeyError, match="make_train_step"):
    objectives.capacity_loss(CONFIG, 10)(_params(), X, jax.random.key(0),
                                         {"gamma": 1.0, "capacity_max": 1.0})


def _state(hyper, seed=0):
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
  return train.create_train_state(CONFIG, tx, seed, hyper), tx


def test_train_step_feeds_the_step_and_keeps_hyper_clean():
  state, tx = _state({"gamma": 10.0, "capacity_max": 4.0})
  step = jax.jit(objectives.make_train_step(
      objectives.capacity_loss(CONFIG, capacity_steps=8), tx))
  capacities = []
  for _ in range(10):
    state, metrics = step(state, {"image": X.reshape(6, 4, 5)})
    capacities.append(float(metrics["capacity"]))
  np.testing.assert_allclose(capacities, [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4])
  assert set(state.hyper) == {"gamma", "capacity_max"}
  assert int(state.step) == 10


def test_resumed_run_continues_the_capacity_schedule_exactly(tmp_path):
  """A checkpoint restored mid-schedule gives the uninterrupted C sequence."""
  batches = [(jax.random.uniform(jax.random.key(100 + i), (6, 4, 5)) > 0.5)
             .astype(jnp.float32) for i in range(12)]
  state, tx = _state({"gamma": 10.0, "capacity_max": 6.0})
  step = jax.jit(objectives.make_train_step(
      objectives.capacity_loss(CONFIG, capacity_steps=9), tx))

  def run(state, start, stop):
    seq = []
    for i in range(start, stop):
      state, metrics = step(state, {"image": batches[i]})
      seq.append((float(metrics["capacity"]), float(metrics["loss"])))
    return state, seq

  _, uninterrupted = run(state, 0, 12)
  first, part1 = run(state, 0, 5)
  manager = train.checkpoint_manager(tmp_path, 2)
  train.save_checkpoint(manager, first)
  manager.wait_until_finished()
  fresh, _ = _state({"gamma": 10.0, "capacity_max": 6.0}, seed=0)
  restored = train.restore_checkpoint(manager, 5, fresh)
  manager.close()
  assert int(restored.step) == 5
  _, part2 = run(restored, 5, 12)
  assert part1 + part2 == uninterrupted
  assert [c for c, _ in uninterrupted][-3:] == [6.0] * 3  # steps 9, 10, 11


def test_vmapped_sweep_gives_each_run_its_weights():
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
  runs = [train.Run(f"beta={b}", 0, 1e-3, {"beta": b}) for b in (1.0, 4.0)]
  states = train.create_states(runs, True, CONFIG, tx)
  step = jax.jit(jax.vmap(objectives.make_train_step(
      objectives.beta_vae_loss(CONFIG), tx), in_axes=(0, None)))
  _, metrics = step(states, {"image": X.reshape(6, 4, 5)})
  np.testing.assert_allclose(metrics["beta"], [1.0, 4.0])
  np.testing.assert_allclose(
      metrics["loss"], metrics["reconstruction"] + metrics["beta"] * metrics["kl"],
      rtol=1e-6)


def _objective(**fields):
  values = dict(name="capacity", gamma=1000.0, capacity_max=25.0,
                capacity_steps=100_000, num_samples=1)
  values.update(fields)
  return ml_collections.ConfigDict(values)


@pytest.mark.parametrize("fields,text", [
    (dict(gamma=-1.0), "config.objective.gamma=-1.0"),
    (dict(capacity_max=-5.0), "config.objective.capacity_max=-5.0"),
    (dict(capacity_steps=0), "config.objective.capacity_steps=0"),
    (dict(capacity_steps=2.5), "config.objective.capacity_steps=2.5"),
    (dict(name="dip_vae"), "config.objective.name='dip_vae'"),
    (dict(num_samples=0), "config.objective.num_samples=0"),
])
def test_bad_capacity_settings_are_one_line_config_errors(fields, text):
  with pytest.raises(config_utils.ConfigError) as error:
    objectives.validate_objective(_objective(**fields))
  message = str(error.value)
  assert text in message and "\n" not in message and "is invalid" in message


def test_bad_beta_is_a_one_line_config_error():
  section = ml_collections.ConfigDict(dict(name="beta_vae", beta=-4.0,
                                           num_samples=1))
  with pytest.raises(config_utils.ConfigError,
                     match=r"^config\.objective\.beta=-4\.0 is invalid: must be >= 0"):
    objectives.validate_objective(section)
  with pytest.raises(config_utils.ConfigError, match="beta is missing"):
    objectives.check_weights("beta_vae", {})
  with pytest.raises(config_utils.ConfigError, match="capacity_steps=0"):
    objectives.capacity_loss(CONFIG, 0)
  with pytest.raises(config_utils.ConfigError, match="capacity_steps=0"):
    objectives.capacity_schedule(3, 1.0, 0)


def test_make_loss_picks_the_objective():
  beta = objectives.make_loss(ml_collections.ConfigDict(
      dict(name="beta_vae", beta=4.0, num_samples=1)), CONFIG)
  _, metrics = beta(_params(), X, jax.random.key(0), {"beta": 4.0})
  assert "normalised_beta" in metrics
  capacity = objectives.make_loss(_objective(capacity_steps=10), CONFIG)
  _, metrics = capacity(_params(), X, jax.random.key(0),
                        {"gamma": 1.0, "capacity_max": 2.0, objectives.STEP_KEY: 5})
  np.testing.assert_allclose(metrics["capacity"], 1.0)
