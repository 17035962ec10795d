"""Disentangling objectives: beta-VAE and the capacity-annealed beta-VAE.

Both are `loss(params, x, rng, hyper) -> (loss, metrics)` functions, the form
`train.make_train_step` takes, with x the flattened batch [B, D]:

  * beta-VAE (Higgins et al. 2017):
        loss = reconstruction + beta * KL;
  * capacity (Burgess et al. 2018):
        loss = reconstruction + gamma * |KL - C(step)|,
        C(step) = C_max * min(step / capacity_steps, 1),
    C rising linearly from 0 to C_max nats over `capacity_steps` steps and
    held there afterwards.

Reconstruction convention: `reconstruction` is -log p(x|z) summed over the
D pixels of an example (for binary data, the Bernoulli cross-entropy summed
over pixels, in nats), then averaged over the batch; KL is KL(q(z|x) || N(0,
I)) summed over the J latents, averaged over the batch. So the loss is per
example, not per pixel, and beta = 1 gives exactly the negative ELBO of
`train.elbo_terms` (estimator B, closed-form KL). Beside beta the metrics
report the normalised beta of Higgins et al., beta * J / D, which is the
weight one would use with a per-pixel-mean reconstruction.

The weights beta, gamma and C_max are read from `hyper` (`state.hyper`), so a
vmapped sweep gives every run its own values. `capacity_steps` is static (a
config int): it is part of the program.

Where C lives. C is a pure function of the step number, C_max and
`capacity_steps`; the step is checkpointed (`TrainState.step`), C_max is
checkpointed in `state.hyper`, and `capacity_steps` comes from the config
(the dSprites experiment records it in run_info.json and refuses to resume
with a different value). So a resumed run continues the schedule exactly,
with no float accumulator to drift. `train.make_train_step` does not pass the
step to the loss, so `make_train_step` here wraps it and hands the loss
`hyper["step"]` for the duration of the call.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from avb import config_utils
from avb import models
from avb import train

Metrics = dict[str, jax.Array]

OBJECTIVES = ("beta_vae", "capacity")
# The key under which `make_train_step` shows the loss the state's step.
STEP_KEY = "step"
# Each objective's float weights: what `state.hyper` must hold (and a sweep
# may vary), with the fix a bad value's message names.
HYPER_FIELDS = {
    "beta_vae": ("beta",),
    "capacity": ("gamma", "capacity_max"),
}
_WEIGHT_HINTS = {
    "beta": "must be >= 0 (1 is the plain VAE; Higgins et al. use 4 on dSprites)",
    "gamma": "must be >= 0 (Burgess et al. use 1000)",
    "capacity_max": "must be >= 0 nats (Burgess et al. use 25 on dSprites)",
}


def capacity_schedule(step: jax.Array | int, capacity_max: jax.Array | float,
                      capacity_steps: int) -> jax.Array:
  """C(step) = C_max * min(step / capacity_steps, 1): linear, then held.

  Args:
    step: the number of updates applied so far (any shape).
    capacity_max: C_max in nats.
    capacity_steps: steps to reach C_max, >= 1.

  Returns:
    float32 C, the shape of `step` broadcast with `capacity_max`.
  """
  capacity_steps = check_capacity_steps(capacity_steps)
  fraction = jnp.minimum(jnp.asarray(step, jnp.float32) / capacity_steps, 1.0)
  return jnp.asarray(capacity_max, jnp.float32) * fraction


def check_capacity_steps(capacity_steps: Any) -> int:
  """`capacity_steps` as an int >= 1, or a one-line ConfigError."""
  if isinstance(capacity_steps, bool) or not isinstance(capacity_steps, int) or (
      capacity_steps < 1):
    raise config_utils.ConfigError(
        f"config.objective.capacity_steps={capacity_steps!r} is invalid: must "
        "be an int >= 1 (the number of steps over which C rises from 0 to "
        "C_max; Burgess et al. use 100000)")
  return capacity_steps


def check_weights(name: str, hyper: dict[str, float]) -> None:
  """Refuses a missing or negative beta, gamma or C_max with a one-line ConfigError.

  Args:
    name: "beta_vae" or "capacity".
    hyper: the objective's weights, e.g. one swept run's values.
  """
  if name not in OBJECTIVES:
    raise config_utils.ConfigError(
        f"config.objective.name={name!r} is invalid: allowed: "
        f"{', '.join(OBJECTIVES)}")
  for field in HYPER_FIELDS[name]:
    if field not in hyper:
      raise config_utils.ConfigError(
          f"config.objective.{field} is missing: the {name} objective needs "
          f"it as a float ({_WEIGHT_HINTS[field]})")
    value = hyper[field]
    if not math.isfinite(float(value)) or float(value) < 0:
      raise config_utils.ConfigError(
          f"config.objective.{field}={value!r} is invalid: {_WEIGHT_HINTS[field]}")


def validate_objective(objective: ml_collections.ConfigDict) -> None:
  """Checks `config.objective` (name, weights, capacity_steps, num_samples)."""
  name = objective.get("name")
  check_weights(name, {k: v for k, v in objective.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)})
  if name == "capacity":
    check_capacity_steps(objective.get("capacity_steps"))
  num_samples = objective.get("num_samples", 1)
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or (
      num_samples < 1):
    raise config_utils.ConfigError(
        f"config.objective.num_samples={num_samples!r} is invalid: must be an "
        "int >= 1 (L, samples of z per example; the papers use 1)")


def _terms(model_config: models.ModelConfig, params: Any, x: jax.Array,
           rng: jax.Array, num_samples: int) -> Metrics:
  """Batch means of -log p(x|z) and KL, and the per-latent KL [J]."""
  terms = train.elbo_terms(model_config, params, x, rng, "B", num_samples)
  return {
      "reconstruction": -jnp.mean(terms["reconstruction"]),
      "kl": jnp.mean(terms["kl"]),
      "kl_per_latent": jnp.mean(terms["kl_per_latent"], axis=0),  # [J]
      "elbo": jnp.mean(terms["elbo"]),
  }


def beta_vae_loss_fn(params: Any, x: jax.Array, rng: jax.Array,
                     hyper: dict[str, jax.Array], *,
                     model_config: models.ModelConfig,
                     num_samples: int = 1) -> tuple[jax.Array, Metrics]:
  """reconstruction + beta * KL for one minibatch x [B, D]."""
  terms = _terms(model_config, params, x, rng, num_samples)
  beta = hyper["beta"]
  loss = terms["reconstruction"] + beta * terms["kl"]
  return loss, {
      "loss": loss,
      **terms,
      "beta": beta,
      "normalised_beta": beta * model_config.num_latents / model_config.data_dim,
  }


def capacity_loss_fn(params: Any, x: jax.Array, rng: jax.Array,
                     hyper: dict[str, jax.Array], *,
                     model_config: models.ModelConfig, capacity_steps: int,
                     num_samples: int = 1) -> tuple[jax.Array, Metrics]:
  """reconstruction + gamma * |KL - C(step)| for one minibatch x [B, D].

  `hyper` must hold "gamma", "capacity_max" and the step (`STEP_KEY`), which
  `make_train_step` adds.
  """
  if STEP_KEY not in hyper:
    raise KeyError(
        f"the capacity loss reads the step from hyper[{STEP_KEY!r}]; build the "
        "step with objectives.make_train_step, which provides it")
  terms = _terms(model_config, params, x, rng, num_samples)
  capacity = capacity_schedule(hyper[STEP_KEY], hyper["capacity_max"],
                               capacity_steps)
  gamma = hyper["gamma"]
  loss = terms["reconstruction"] + gamma * jnp.abs(terms["kl"] - capacity)
  return loss, {"loss": loss, **terms, "capacity": capacity, "gamma": gamma}


def beta_vae_loss(model_config: models.ModelConfig, *,
                  num_samples: int = 1) -> Callable:
  """`loss(params, x, rng, hyper)` of the beta-VAE; beta is `hyper["beta"]`."""
  return functools.partial(beta_vae_loss_fn, model_config=model_config,
                           num_samples=num_samples)


def capacity_loss(model_config: models.ModelConfig, capacity_steps: int, *,
                  num_samples: int = 1) -> Callable:
  """`loss(params, x, rng, hyper)` of the capacity objective.

  gamma and C_max are `hyper["gamma"]` and `hyper["capacity_max"]`; the step
  is `hyper[STEP_KEY]` (see `make_train_step`).

  Raises:
    ConfigError: capacity_steps is not an int >= 1.
  """
  return functools.partial(capacity_loss_fn, model_config=model_config,
                           capacity_steps=check_capacity_steps(capacity_steps),
                           num_samples=num_samples)


def make_loss(objective: ml_collections.ConfigDict,
              model_config: models.ModelConfig) -> Callable:
  """The loss `config.objective` names, after validating it."""
  validate_objective(objective)
  num_samples = objective.get("num_samples", 1)
  if objective.name == "beta_vae":
    return beta_vae_loss(model_config, num_samples=num_samples)
  return capacity_loss(model_config, objective.capacity_steps,
                       num_samples=num_samples)


def make_train_step(loss: Callable, tx: optax.GradientTransformation,
                    **kwargs) -> Callable[[train.TrainState, dict],
                                          tuple[train.TrainState, Metrics]]:
  """`train.make_train_step` whose loss also sees the state's step.

  During the call the loss's `hyper` holds `hyper[STEP_KEY] = state.step`
  (int32, per run under vmap); the returned state's `hyper` is the input's,
  so the step is never stored twice.

  Args:
    loss: e.g. `capacity_loss(...)` or `beta_vae_loss(...)`.
    tx: the optimizer.
    **kwargs: passed to `train.make_train_step`.
  """
  inner = train.make_train_step(loss, tx, **kwargs)

  def train_step(state: train.TrainState, batch: dict):
    hyper = {**state.hyper, STEP_KEY: state.step}
    new_state, metrics = inner(state.replace(hyper=hyper), batch)
    return new_state.replace(hyper=state.hyper), metrics

  return train_step
