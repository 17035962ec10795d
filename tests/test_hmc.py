"""Tests for avb.hmc: invariance, the integrator's geometry, adaptation, errors.

The oracle target is a correlated 2-D Gaussian, whose samples, moments and
marginals are known exactly (numpy draws, scipy's normal CDF). Monte Carlo
checks allow 5 standard errors; seeds are fixed, so the tests are
deterministic.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from avb import hmc

NUM_STANDARD_ERRORS = 5.0
COV = np.array([[1.0, 0.9 * 0.5], [0.9 * 0.5, 0.25]])  # correlation 0.9
PRECISION = np.linalg.inv(COV)


@pytest.fixture(autouse=True)
def x64():
  """float64 throughout: the energy and reversibility checks need it."""
  with jax.enable_x64(True):
    yield


def gaussian_log_prob(z):
  """log N(z; 0, COV) up to a constant, z: [..., 2] -> [...]."""
  return -0.5 * jnp.einsum("...i,ij,...j->...", z, PRECISION, z)


def anharmonic_log_prob(z):
  """A non-Gaussian target (quartic tails), so the energy test is generic."""
  return gaussian_log_prob(z) - 0.1 * jnp.sum(z**4, axis=-1)


# Jitted, with log_prob_fn and num_leapfrog static: eager calls would dispatch
# every leapfrog operation separately.
_hmc_step = jax.jit(hmc.hmc_step, static_argnums=(2, 4))
_leapfrog = jax.jit(hmc.leapfrog, static_argnums=(2, 4))


def exact_samples(num, seed=0, cov=COV):
  return np.random.default_rng(seed).multivariate_normal(np.zeros(2), cov, num)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _transitions(rng, position, log_prob_fn, num_transitions, num_leapfrog,
                 step_size):
  def body(position, t):
    position, info = hmc.hmc_step(jax.random.fold_in(rng, t), position,
                                  log_prob_fn, step_size, num_leapfrog)
    return position, info["accept_prob"]
  return jax.lax.scan(body, position, jnp.arange(num_transitions))


def _moments_match(samples, cov):
  """Mean and covariance within 5 standard errors of (0, cov)."""
  num = samples.shape[0]
  mean_se = np.sqrt(np.diag(cov) / num)
  products = samples[:, :, None] * samples[:, None, :]  # [N, 2, 2]
  cov_se = products.std(axis=0) / np.sqrt(num)
  return (np.all(np.abs(samples.mean(0)) < NUM_STANDARD_ERRORS * mean_se)
          and np.all(np.abs(products.mean(0) - cov)
                     < NUM_STANDARD_ERRORS * cov_se))


def test_hmc_leaves_correlated_gaussian_invariant():
  init = exact_samples(4000)
  final, accept = _transitions(jax.random.key(0), jnp.asarray(init),
                               gaussian_log_prob, 20, 10, 0.15)
  final = np.asarray(final)
  # The kernel must actually move (an identity map is trivially invariant).
  assert 0.5 < float(np.mean(accept)) < 1.0
  moved = np.mean(np.any(final != init, axis=-1))
  assert moved > 0.9
  assert _moments_match(final, COV)
  for i in range(2):
    ks = stats.kstest(final[:, i], stats.norm(scale=np.sqrt(COV[i, i])).cdf)
    assert ks.pvalue > 1e-3, (i, ks)


def test_moment_check_detects_a_wrong_target():
  # The same check on chains that target 2 * COV: it must fail, so the
  # invariance test above has the power to see a broken kernel.
  init = exact_samples(4000)
  wide = lambda z: 0.5 * gaussian_log_prob(z)
  final, _ = _transitions(jax.random.key(0), jnp.asarray(init), wide, 20, 10,
                          0.15)
  assert not _moments_match(np.asarray(final), COV)


def test_leapfrog_is_reversible():
  rng = np.random.default_rng(1)
  position = jnp.asarray(rng.normal(size=(16, 2)))
  momentum = jnp.asarray(rng.normal(size=(16, 2)))
  end_position, end_momentum = _leapfrog(
      position, momentum, anharmonic_log_prob, 0.1, 25)
  back_position, back_momentum = _leapfrog(
      end_position, -end_momentum, anharmonic_log_prob, 0.1, 25)
  assert float(jnp.max(jnp.abs(end_position - position))) > 0.1
  np.testing.assert_allclose(back_position, position, atol=1e-10)
  np.testing.assert_allclose(back_momentum, -momentum, atol=1e-10)


def test_leapfrog_energy_error_is_second_order():
  rng = np.random.default_rng(2)
  position = jnp.asarray(rng.normal(size=(64, 2)))
  momentum = jnp.asarray(rng.normal(size=(64, 2)))

  def energy(q, p):
    return -anharmonic_log_prob(q) + 0.5 * jnp.sum(p**2, axis=-1)

  def max_energy_error(step_size, num_steps):
    q, p = _leapfrog(position, momentum, anharmonic_log_prob, step_size,
                     num_steps)
    return float(jnp.max(jnp.abs(energy(q, p) - energy(position, momentum))))

  # Same trajectory length 1.0; halving the step should quarter the error.
  coarse, fine = max_energy_error(0.05, 20), max_energy_error(0.025, 40)
  assert 3.0 < coarse / fine < 5.0, (coarse, fine)


def test_batch_and_event_shapes_and_per_chain_step_sizes():
  # Chains [3, 4], each an event of shape [2, 5]; step sizes per column of
  # the chain grid, broadcasting over the first batch axis.
  log_prob = lambda z: -0.5 * jnp.sum(z**2, axis=(-2, -1))  # [3, 4]
  position = jnp.ones((3, 4, 2, 5))
  step_size = jnp.array([1e-9, 0.3, 0.3, 0.3])
  new, info = _hmc_step(jax.random.key(3), position, log_prob, step_size, 5)
  assert new.shape == position.shape
  assert info["accept_prob"].shape == info["accepted"].shape == (3, 4)
  np.testing.assert_allclose(info["log_prob"], log_prob(new), rtol=1e-12)
  # A step of 1e-9 barely moves its chains; the others move.
  assert float(jnp.max(jnp.abs(new[:, 0] - 1.0))) < 1e-7
  jumps = jnp.max(jnp.abs(new[:, 1:] - 1.0), axis=(-2, -1))  # [3, 3]
  assert float(jnp.min(jumps)) > 1e-3


def test_divergent_trajectories_are_rejected_without_nan():
  stiff = lambda z: -1e6 * jnp.sum(z**2, axis=-1)
  position = jnp.full((8, 2), 0.5)
  new, info = _hmc_step(jax.random.key(4), position, stiff, 1.0, 10)
  assert not np.any(np.asarray(info["accepted"]))
  np.testing.assert_array_equal(new, position)
  assert np.all(np.isfinite(np.asarray(info["accept_prob"])))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _adapted(rng, step_size, target_accept, shared):
  init = jnp.asarray(exact_samples(256, seed=5))
  if not shared:
    step_size = jnp.full((256,), step_size)
  return hmc.run_chain(rng, init, gaussian_log_prob, 100, step_size, 10, 300,
                       target_accept=target_accept)


@pytest.mark.parametrize("initial_step_size", [0.005, 2.0])
@pytest.mark.parametrize("shared", [True, False])
def test_adaptation_reaches_target_acceptance(initial_step_size, shared):
  samples, step_size, info = _adapted(jax.random.key(6), initial_step_size,
                                      0.9, shared)
  assert samples.shape == (100, 256, 2)
  assert step_size.shape == (() if shared else (256,))
  # Measured with the step size frozen after warm-up.
  assert abs(float(jnp.mean(info["accept_prob"])) - 0.9) < 0.03


def test_adaptation_follows_the_target():
  # 0.75 rather than lower: near leapfrog's stability limit (step 2 / 5 for
  # this target's stiffest direction) acceptance jumps with the step size.
  _, low_step, low = _adapted(jax.random.key(7), 0.1, 0.75, True)
  _, high_step, _ = _adapted(jax.random.key(7), 0.1, 0.9, True)
  assert abs(float(jnp.mean(low["accept_prob"])) - 0.75) < 0.03
  assert float(low_step) > float(high_step)


def test_adapt_step_size_averages_over_shared_chains():
  accept = jnp.array([[1.0, 0.0], [1.0, 1.0]])  # [2 chains, 2 datapoints]
  new = hmc.adapt_step_size(jnp.array([1.0, 1.0]), accept, 0.9, 1.0)
  np.testing.assert_allclose(new, np.exp([0.1, 0.5 - 0.9]), rtol=1e-12)
  shared = hmc.adapt_step_size(jnp.asarray(1.0), accept, 0.9, 1.0)
  np.testing.assert_allclose(shared, np.exp(0.75 - 0.9), rtol=1e-12)


@pytest.mark.parametrize("step_size", [0.0, -0.1, float("nan"), float("inf"),
                                       np.array([0.1, 0.0])])
def test_bad_step_size_raises(step_size):
  with pytest.raises(hmc.HMCError, match=r"step_size .*\(0, inf\)"):
    hmc.hmc_step(jax.random.key(0), jnp.zeros((2, 2)), gaussian_log_prob,
                 step_size, 10)


@pytest.mark.parametrize("num_leapfrog", [0, 1001, 2.5, True, None])
def test_bad_num_leapfrog_raises(num_leapfrog):
  with pytest.raises(hmc.HMCError, match=r"num_leapfrog .*\[1, 1000\]"):
    hmc.hmc_step(jax.random.key(0), jnp.zeros((2, 2)), gaussian_log_prob,
                 0.1, num_leapfrog)


@pytest.mark.parametrize("target_accept", [0.0, 1.0, 1.5, -0.2, "0.9"])
def test_bad_target_accept_raises(target_accept):
  with pytest.raises(hmc.HMCError, match=r"target_accept .*\(0, 1\)"):
    hmc.run_chain(jax.random.key(0), jnp.zeros((2, 2)), gaussian_log_prob, 5,
                  0.1, 10, 5, target_accept=target_accept)


def test_hmc_error_is_a_value_error_and_names_the_value():
  assert issubclass(hmc.HMCError, ValueError)
  with pytest.raises(ValueError, match="1001"):
    hmc.check_num_leapfrog(1001)


def test_log_prob_must_return_one_value_per_chain():
  with pytest.raises(hmc.HMCError, match="one log-density per chain"):
    hmc.hmc_step(jax.random.key(0), jnp.zeros((3, 2)),
                 lambda z: jnp.sum(z, axis=0), 0.1, 10)
