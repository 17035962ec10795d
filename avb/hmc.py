"""Hamiltonian (hybrid) Monte Carlo in pure JAX, batched over chains.

Kingma & Welling (2013) use HMC twice: as the E-step of their Monte Carlo EM
baseline (section 5: 10 leapfrog steps, step size tuned towards a 90%
acceptance rate) and to sample posteriors for the marginal-likelihood estimator
of their appendix D. Both need many independent chains at once (one or more per
datapoint), so everything here works on a batch of chains.

Shapes: a position is [*batch_shape, *event_shape]; `log_prob_fn(position)`
returns the per-chain log-density, [*batch_shape], so `batch_shape` is read off
the output of `log_prob_fn`. The chains must be independent: the gradient of
each chain's log-density is taken as the gradient of their sum, which is only
right if chain i's log-density does not depend on chain j's position.

A step size is a positive array that broadcasts against `batch_shape` (right
aligned, like numpy): a scalar is shared by all chains, a [*batch_shape] array
gives each chain its own. The adaptation rule adapts each step size to the mean
acceptance probability of the chains that share it.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

LogProbFn = Callable[[jax.Array], jax.Array]

MAX_LEAPFROG = 1000
# Warm-up transitions over which the adaptation gain stays near adapt_rate.
_ADAPT_DELAY = 10.0


class HMCError(ValueError):
  """An HMC argument is outside its valid range."""


# ----------------------------------------------------------------------------
# Validation. Values that are only known inside jit (tracers) are left to the
# caller; everything that fixes shapes or loop lengths must be concrete.


def _is_concrete(value) -> bool:
  return not isinstance(value, jax.core.Tracer)


def check_step_size(step_size) -> None:
  """Raises HMCError unless every step size is finite and > 0.

  Traced values (inside jit) cannot be checked and pass through.
  """
  if not _is_concrete(step_size):
    return
  values = np.asarray(step_size, dtype=np.float64)
  bad = values[~(np.isfinite(values) & (values > 0))]
  if bad.size:
    raise HMCError(
        f"step_size must be finite and > 0, i.e. in (0, inf); got "
        f"{bad.ravel()[:5].tolist()} in {step_size!r}.")


def check_num_leapfrog(num_leapfrog) -> int:
  """Returns num_leapfrog as an int, or raises HMCError outside [1, 1000]."""
  try:
    if isinstance(num_leapfrog, (bool, np.bool_)):
      raise TypeError
    value = operator.index(num_leapfrog)
  except TypeError:
    raise HMCError(
        f"num_leapfrog must be an integer in [1, {MAX_LEAPFROG}], got "
        f"{num_leapfrog!r}.") from None
  if not 1 <= value <= MAX_LEAPFROG:
    raise HMCError(
        f"num_leapfrog must be an integer in [1, {MAX_LEAPFROG}], got {value}.")
  return value


def check_target_accept(target_accept) -> float:
  """Returns target_accept as a float, or raises HMCError outside (0, 1)."""
  if (isinstance(target_accept, (bool, np.bool_))
      or not isinstance(target_accept, numbers.Real)
      or not 0.0 < float(target_accept) < 1.0):
    raise HMCError(
        f"target_accept must be a number in the open interval (0, 1), got "
        f"{target_accept!r}.")
  return float(target_accept)


def _check_count(value, name: str, minimum: int) -> int:
  try:
    if isinstance(value, (bool, np.bool_)):
      raise TypeError
    count = operator.index(value)
  except TypeError:
    count = minimum - 1
  if count < minimum:
    raise HMCError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  return count


def _check_adapt_rate(adapt_rate, adapt_decay) -> None:
  if not (isinstance(adapt_rate, numbers.Real) and adapt_rate >= 0
          and math.isfinite(adapt_rate)):
    raise HMCError(f"adapt_rate must be finite and >= 0, got {adapt_rate!r}.")
  if not (isinstance(adapt_decay, numbers.Real) and 0 <= adapt_decay <= 1):
    raise HMCError(f"adapt_decay must be in [0, 1], got {adapt_decay!r}.")


# ----------------------------------------------------------------------------
# The integrator.


def _value_and_grad(log_prob_fn: LogProbFn) -> Callable:
  """position -> (per-chain log_prob [*batch], gradient [*position.shape])."""

  def total(position):
    log_prob = log_prob_fn(position)
    return jnp.sum(log_prob), log_prob

  def value_and_grad(position):
    grad, log_prob = jax.grad(total, has_aux=True)(position)
    return log_prob, grad

  return value_and_grad


def _batch_ndim(log_prob: jax.Array, position: jax.Array) -> int:
  if log_prob.shape != position.shape[:log_prob.ndim]:
    raise HMCError(
        f"log_prob_fn must return one log-density per chain, shaped like a "
        f"prefix of the position's shape {position.shape}; got "
        f"{log_prob.shape}.")
  return log_prob.ndim


def _per_coordinate(step_size, batch_shape: tuple[int, ...],
                    event_ndim: int, dtype) -> jax.Array:
  """The step size broadcast to [*batch_shape, 1, ..., 1] for the positions."""
  step_size = jnp.broadcast_to(jnp.asarray(step_size, dtype), batch_shape)
  return step_size.reshape(batch_shape + (1,) * event_ndim)


def _integrate(value_and_grad, position, momentum, log_prob, grad, step_size,
               num_leapfrog: int):
  """num_leapfrog leapfrog steps from a point whose log_prob and grad are known.

  Each gradient is computed once and used for the closing half step of one
  leapfrog step and the opening half step of the next.
  """
  half_step = 0.5 * step_size

  def body(_, carry):
    position, momentum, _, grad = carry
    momentum = momentum + half_step * grad
    position = position + step_size * momentum
    log_prob, grad = value_and_grad(position)
    momentum = momentum + half_step * grad
    return position, momentum, log_prob, grad

  return jax.lax.fori_loop(0, num_leapfrog, body,
                           (position, momentum, log_prob, grad))


def leapfrog(position: jax.Array, momentum: jax.Array, log_prob_fn: LogProbFn,
             step_size, num_leapfrog: int) -> tuple[jax.Array, jax.Array]:
  """Simulates Hamiltonian dynamics for H(q, p) = -log_prob(q) + |p|^2 / 2.

  The leapfrog (Stormer-Verlet) integrator: volume preserving and reversible
  (negating the final momentum and integrating again returns to the start),
  with an energy error of order step_size^2 over a fixed trajectory length.
  Both properties are what make the Metropolis correction in `hmc_step` exact.

  Args:
    position: [*batch_shape, *event_shape].
    momentum: shaped like `position`.
    log_prob_fn: position -> per-chain log-density [*batch_shape].
    step_size: > 0, broadcasting against batch_shape.
    num_leapfrog: number of steps, an int in [1, 1000].

  Returns:
    (position, momentum) at the end of the trajectory.
  """
  check_step_size(step_size)
  num_leapfrog = check_num_leapfrog(num_leapfrog)
  value_and_grad = _value_and_grad(log_prob_fn)
  log_prob, grad = value_and_grad(position)
  batch_ndim = _batch_ndim(log_prob, position)
  step = _per_coordinate(step_size, position.shape[:batch_ndim],
                         position.ndim - batch_ndim, position.dtype)
  position, momentum, _, _ = _integrate(
      value_and_grad, position, momentum, log_prob, grad, step, num_leapfrog)
  return position, momentum


# ----------------------------------------------------------------------------
# One transition.


def hmc_step(rng: jax.Array, position: jax.Array, log_prob_fn: LogProbFn,
             step_size, num_leapfrog: int
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One HMC transition for every chain, leaving exp(log_prob_fn) invariant.

  Draws a fresh momentum p ~ N(0, I), integrates with `leapfrog`, and accepts
  the end point with probability min(1, exp(-H_new + H_old)), decided in log
  space. A trajectory whose energy is not finite (a divergence) is rejected.

  Args:
    rng: PRNG key.
    position: [*batch_shape, *event_shape], the chains' current states.
    log_prob_fn: position -> per-chain log-density [*batch_shape], up to a
      constant.
    step_size: > 0 and finite, broadcasting against batch_shape.
    num_leapfrog: leapfrog steps per transition, an int in [1, 1000].

  Returns:
    (new_position, info), info holding per-chain [*batch_shape] arrays:
      "accept_prob": min(1, exp(-delta H)), 0 for a divergent trajectory.
      "accepted": bool, whether the proposal was taken.
      "log_prob": log_prob_fn at new_position.

  Raises:
    HMCError: a concrete step size that is not finite and > 0, or a bad
      num_leapfrog.
  """
  check_step_size(step_size)
  num_leapfrog = check_num_leapfrog(num_leapfrog)
  momentum_rng, accept_rng = jax.random.split(rng)
  value_and_grad = _value_and_grad(log_prob_fn)
  log_prob, grad = value_and_grad(position)  # [*batch], [*position.shape]
  batch_ndim = _batch_ndim(log_prob, position)
  batch_shape = position.shape[:batch_ndim]
  event_axes = tuple(range(batch_ndim, position.ndim))
  step = _per_coordinate(step_size, batch_shape, len(event_axes),
                         position.dtype)

  momentum = jax.random.normal(momentum_rng, position.shape, position.dtype)
  new_position, new_momentum, new_log_prob, _ = _integrate(
      value_and_grad, position, momentum, log_prob, grad, step, num_leapfrog)

  kinetic = 0.5 * jnp.sum(jnp.square(momentum), axis=event_axes)  # [*batch]
  new_kinetic = 0.5 * jnp.sum(jnp.square(new_momentum), axis=event_axes)
  log_accept_ratio = (new_log_prob - new_kinetic) - (log_prob - kinetic)
  # NaN (e.g. inf - inf after an overflow) must reject, never accept.
  log_accept_ratio = jnp.where(
      jnp.isnan(log_accept_ratio), -jnp.inf, log_accept_ratio)
  log_accept_ratio = jnp.minimum(log_accept_ratio, 0.0)
  log_uniform = jnp.log(jax.random.uniform(
      accept_rng, batch_shape, dtype=log_accept_ratio.dtype))
  accepted = log_uniform < log_accept_ratio

  expand = lambda a: a.reshape(batch_shape + (1,) * len(event_axes))
  new_position = jnp.where(expand(accepted), new_position, position)
  info = {
      "accept_prob": jnp.exp(log_accept_ratio),
      "accepted": accepted,
      "log_prob": jnp.where(accepted, new_log_prob, log_prob),
  }
  return new_position, info


# ----------------------------------------------------------------------------
# Step-size adaptation and chains.


def _mean_to_shape(values: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Averages `values` over the axes that `shape` broadcasts along."""
  padded = (1,) * (values.ndim - len(shape)) + tuple(shape)
  axes = tuple(i for i, (n, m) in enumerate(zip(padded, values.shape))
               if n == 1 and m != 1)
  return jnp.mean(values, axis=axes, keepdims=True).reshape(shape)


def adapt_step_size(step_size: jax.Array, accept_prob: jax.Array,
                    target_accept: float, rate) -> jax.Array:
  """One stochastic-approximation update of the step size.

  log step_size += rate * (mean accept_prob - target_accept): the step size
  grows while the chains accept more often than the target and shrinks while
  they accept less. Its fixed point is E[accept_prob] = target_accept (Robbins
  & Monro 1951). Working on the log keeps the step size positive.

  Args:
    step_size: current step sizes, broadcasting against accept_prob's shape.
    accept_prob: per-chain acceptance probabilities [*batch_shape] of the
      transition just made with `step_size`.
    target_accept: in (0, 1); the paper's is 0.9.
    rate: the gain (a scalar, may be traced).

  Returns:
    The new step sizes, shaped like `step_size`; each moves by the mean
    acceptance probability of the chains that share it.
  """
  step_size = jnp.asarray(step_size)
  mean_accept = _mean_to_shape(accept_prob, step_size.shape)
  return step_size * jnp.exp(rate * (mean_accept - target_accept)).astype(
      step_size.dtype)


def run_chain(rng: jax.Array, init: jax.Array, log_prob_fn: LogProbFn,
              num_steps: int, step_size, num_leapfrog: int, adapt_steps: int,
              target_accept: float = 0.9, adapt_rate: float = 1.0,
              adapt_decay: float = 0.5) -> tuple[jax.Array, jax.Array, dict]:
  """Warm-up with step-size adaptation, then `num_steps` kept transitions.

  Warm-up: `adapt_steps` transitions, after each of which the step size moves
  by `adapt_step_size` with gain adapt_rate * (1 + t / 10)^-adapt_decay at
  warm-up transition t. The decaying gain lets the step size settle; the delay
  of 10 transitions and the slow decay keep it large long enough to cross
  several e-folds, which matters when the step size starts too small: a chain
  that accepts everything raises log step_size by only rate * (1 - target).
  Then the step size is frozen, so the kept transitions form a proper Markov
  chain that leaves the target invariant. Warm-up states are not returned.

  Transition k (warm-up first) uses key `jax.random.fold_in(rng, k)`.

  Args:
    rng: PRNG key.
    init: initial positions [*batch_shape, *event_shape].
    log_prob_fn: position -> per-chain log-density [*batch_shape].
    num_steps: transitions kept after warm-up, >= 1.
    step_size: initial step size(s), > 0, broadcasting against batch_shape;
      its shape decides which chains share a step size.
    num_leapfrog: leapfrog steps per transition, in [1, 1000].
    adapt_steps: warm-up transitions, >= 0 (0: no adaptation).
    target_accept: the acceptance probability aimed at, in (0, 1).
    adapt_rate: the adaptation gain, >= 0.
    adapt_decay: the gain's decay exponent, in [0, 1] (0: constant gain).

  Returns:
    (samples, step_size, info): samples [num_steps, *init.shape]; the adapted
    step size (shaped like the `step_size` given); info of the kept
    transitions, each value [num_steps, *batch_shape] (see `hmc_step`).

  Raises:
    HMCError: any argument outside its valid range.
  """
  check_step_size(step_size)
  num_leapfrog = check_num_leapfrog(num_leapfrog)
  target_accept = check_target_accept(target_accept)
  num_steps = _check_count(num_steps, "num_steps", 1)
  adapt_steps = _check_count(adapt_steps, "adapt_steps", 0)
  _check_adapt_rate(adapt_rate, adapt_decay)
  step_size = jnp.asarray(step_size, jnp.result_type(init))

  def warmup(carry, t):
    position, step_size = carry
    position, info = hmc_step(jax.random.fold_in(rng, t), position,
                              log_prob_fn, step_size, num_leapfrog)
    gain = adapt_rate * (1.0 + t / _ADAPT_DELAY) ** (-adapt_decay)
    step_size = adapt_step_size(step_size, info["accept_prob"], target_accept,
                                gain)
    return (position, step_size), None

  position = init
  if adapt_steps:
    (position, step_size), _ = jax.lax.scan(
        warmup, (init, step_size), jnp.arange(adapt_steps))

  def sample(position, t):
    position, info = hmc_step(jax.random.fold_in(rng, t), position,
                              log_prob_fn, step_size, num_leapfrog)
    return position, (position, info)

  _, (samples, info) = jax.lax.scan(
      sample, position, adapt_steps + jnp.arange(num_steps))
  return samples, step_size, info
