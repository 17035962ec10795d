"""Monte Carlo EM with an HMC E-step: the paper's baseline for learning p(x|z).

Kingma & Welling (2013, section 5) compare AEVB with Monte Carlo EM on the same
decoder. Per minibatch, as they describe it: the E-step samples the posterior
p(z|x; theta) ∝ p(x|z; theta) p(z) with hybrid Monte Carlo, 10 leapfrog steps
and a step size tuned automatically towards a 90% acceptance rate; the M-step
then takes 5 weight updates of the decoder on log p(x|z) + log p(z) at the
sampled z, with Adagrad and an annealing schedule. There is no encoder.

Choices the paper leaves open, made here:

  * Persistent chains. Each training point keeps its chain's state z_i and its
    own step size between visits (`MCEMState.chain_z`, `.step_size`), so one
    E-step continues a chain that has been following p(z|x_i; theta) as theta
    moved, instead of restarting from the prior. This suits the small training
    sets the paper runs MCEM on (it notes that MCEM, not being an online
    algorithm, cannot be applied efficiently to the full MNIST set) and costs
    N * (J + 1) floats.
  * One HMC transition of 10 leapfrog steps per E-step (`num_transitions=1`);
    more can be asked for.
  * Step-size tuning: after every transition, log eps_i += rate * (a_i - 0.9)
    with a_i datapoint i's acceptance probability (`hmc.adapt_step_size`), at a
    constant rate: the target moves with theta, so adaptation never stops.
    Strictly the E-step is then an adaptive MCMC kernel; with 10 leapfrog steps
    and a 90% target the bias is far below the drift of the posterior itself.
  * Annealed Adagrad: lr_t = lr_0 / (1 + t / anneal_steps), t counting weight
    updates (5 per minibatch), on top of Adagrad's own per-parameter scaling
    (`annealed_adagrad`). The accumulator starts at 0, as in `train`.
  * The weight prior N(0, s^2 I) / N of AEVB's MAP objective applies to the
    decoder here too, so the methods optimise comparable objectives.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from avb import random_streams
from avb import distributions
from avb import hmc
from avb import models
from avb import train

PyTree = Any
Metrics = dict[str, jax.Array]


class MCEMState(flax.struct.PyTreeNode):
  """Everything Monte Carlo EM carries from one minibatch to the next.

  Attributes:
    step: number of `mcem_step`s taken.
    decoder_params: the decoder's parameters (the VAE's params["decoder"]).
    opt_state: the M-step optimizer's state.
    chain_z: the persistent HMC chain of every training point, [N, J].
    step_size: every training point's HMC step size, [N].
  """
  step: jax.Array
  decoder_params: PyTree
  opt_state: PyTree
  chain_z: jax.Array
  step_size: jax.Array


def annealed_adagrad(learning_rate: float, anneal_steps: float,
                     eps: float = 1e-8) -> optax.GradientTransformation:
  """Adagrad with the global rate lr_0 / (1 + t / anneal_steps).

  Args:
    learning_rate: lr_0, > 0.
    anneal_steps: updates after which the rate has halved, > 0.
    eps: Adagrad's denominator offset.

  Returns:
    The optax transformation; its count t is the number of weight updates.
  """
  if not learning_rate > 0 or not anneal_steps > 0:
    raise ValueError(
        f"learning_rate and anneal_steps must be > 0, got {learning_rate!r} "
        f"and {anneal_steps!r}.")
  schedule = lambda count: learning_rate / (1.0 + count / anneal_steps)
  return optax.adagrad(schedule, initial_accumulator_value=0.0, eps=eps)


def create_mcem_state(model_config: models.ModelConfig,
                      tx: optax.GradientTransformation, rng: jax.Array,
                      num_train: int, init_step_size: float = 0.1) -> MCEMState:
  """A fresh state: the VAE's initial decoder, chains started from the prior.

  Args:
    model_config: the VAE's shapes.
    tx: the M-step optimizer.
    rng: PRNG key.
    num_train: N, the number of training points (one chain each).
    init_step_size: every chain's first HMC step size, > 0.

  Returns:
    The state, step 0.
  """
  hmc.check_step_size(init_step_size)
  params_rng, chain_rng = jax.random.split(rng)
  decoder_params = models.init_params(model_config, params_rng)["decoder"]
  chain_z = jax.random.normal(chain_rng, (num_train, model_config.num_latents))
  return MCEMState(step=jnp.zeros((), jnp.int32), decoder_params=decoder_params,
                   opt_state=tx.init(decoder_params), chain_z=chain_z,
                   step_size=jnp.full((num_train,), init_step_size,
                                      chain_z.dtype))


def decoder_log_joint_fn(model_config: models.ModelConfig,
                         decoder_params: PyTree,
                         x: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """Binds x [B, D] and theta: z [..., B, J] -> log p(x|z) + log p(z) [..., B]."""
  decoder = models.Decoder(model_config)

  def log_joint_fn(z: jax.Array) -> jax.Array:
    decoded = decoder.apply({"params": decoder_params}, z)
    return (distributions.likelihood_log_prob(model_config.likelihood, x,
                                              decoded)
            + distributions.standard_normal_log_prob(z))

  return log_joint_fn


def e_step(rng: jax.Array, decoder_params: PyTree, x: jax.Array, z: jax.Array,
           step_size: jax.Array, *, model_config: models.ModelConfig,
           num_leapfrog: int = 10, num_transitions: int = 1,
           target_accept: float = 0.9,
           adapt_rate: float = 0.5) -> tuple[jax.Array, jax.Array, Metrics]:
  """HMC on p(z|x; theta) for every datapoint of the batch, adapting step sizes.

  Transition t uses key `jax.random.fold_in(rng, t)` and is `hmc.hmc_step`
  on `decoder_log_joint_fn`, followed by `hmc.adapt_step_size`.

  Args:
    rng: PRNG key.
    decoder_params: theta.
    x: the batch [B, D].
    z: the chains' current states [B, J].
    step_size: their step sizes [B].
    model_config: the VAE's shapes.
    num_leapfrog: leapfrog steps per transition (the paper: 10).
    num_transitions: HMC transitions per E-step.
    target_accept: the acceptance rate aimed at (the paper: 0.9).
    adapt_rate: gain of the log step-size update.

  Returns:
    (z, step_size, info): the new states [B, J] and step sizes [B], and the
    last transition's info (see `hmc.hmc_step`), each [B].
  """
  target_accept = hmc.check_target_accept(target_accept)
  log_joint_fn = decoder_log_joint_fn(
      model_config, jax.lax.stop_gradient(decoder_params), x)

  def transition(carry, t):
    z, step_size = carry
    z, info = hmc.hmc_step(jax.random.fold_in(rng, t), z, log_joint_fn,
                           step_size, num_leapfrog)
    step_size = hmc.adapt_step_size(step_size, info["accept_prob"],
                                    target_accept, adapt_rate)
    return (z, step_size), info

  (z, step_size), info = jax.lax.scan(
      transition, (z, step_size), jnp.arange(num_transitions))
  return z, step_size, jax.tree.map(lambda v: v[-1], info)


def m_step_loss(decoder_params: PyTree, x: jax.Array, z: jax.Array, *,
                model_config: models.ModelConfig, weight_prior_std: float,
                num_train: int) -> tuple[jax.Array, jax.Array]:
  """-(mean_i log p(x_i, z_i; theta) + log p(theta) / N) at fixed z [B, J]."""
  log_joint = decoder_log_joint_fn(model_config, decoder_params, x)(z)  # [B]
  log_prior = train.weight_log_prior(decoder_params, weight_prior_std)
  mean_log_joint = jnp.mean(log_joint)
  return -(mean_log_joint + log_prior / num_train), mean_log_joint


def m_step(decoder_params: PyTree, opt_state: PyTree, x: jax.Array,
           z: jax.Array, *, model_config: models.ModelConfig,
           tx: optax.GradientTransformation, num_updates: int = 5,
           weight_prior_std: float = 0.0,
           num_train: int = 1) -> tuple[PyTree, PyTree, Metrics]:
  """`num_updates` optimizer steps on `m_step_loss` at the fixed samples z.

  Returns:
    (decoder_params, opt_state, metrics) with metrics "log_joint_before" and
    "log_joint_after": the batch mean of log p(x, z) before the first and
    after the last update, and "loss" after the last.
  """
  loss_fn = functools.partial(
      m_step_loss, x=x, z=jax.lax.stop_gradient(z), model_config=model_config,
      weight_prior_std=weight_prior_std, num_train=num_train)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def update(carry, _):
    params, opt_state = carry
    (_, log_joint), grads = grad_fn(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), log_joint

  (decoder_params, opt_state), log_joints = jax.lax.scan(
      update, (decoder_params, opt_state), None, length=num_updates)
  loss, log_joint_after = loss_fn(decoder_params)
  return decoder_params, opt_state, {
      "log_joint_before": log_joints[0],
      "log_joint_after": log_joint_after,
      "loss": loss,
  }


def mcem_step(state: MCEMState, x: jax.Array, indices: jax.Array,
              rng: jax.Array, *, model_config: models.ModelConfig,
              tx: optax.GradientTransformation, num_train: int,
              weight_prior_std: float = 0.0, num_leapfrog: int = 10,
              num_transitions: int = 1, num_updates: int = 5,
              target_accept: float = 0.9,
              adapt_rate: float = 0.5) -> tuple[MCEMState, Metrics]:
  """One Monte Carlo EM iteration on a minibatch: E-step, then M-step.

  Pure; jit it with everything after `rng` bound (functools.partial).

  Args:
    state: the current `MCEMState`.
    x: the minibatch [B, D].
    indices: the minibatch's rows in the training set [B] (which chains).
    rng: PRNG key of the E-step.
    model_config: the VAE's shapes.
    tx: the M-step optimizer (e.g. `annealed_adagrad`).
    num_train: N, for the weight prior.
    weight_prior_std: std of the decoder's weight prior; 0 turns it off.
    num_leapfrog: leapfrog steps per HMC transition (the paper: 10).
    num_transitions: HMC transitions per E-step.
    num_updates: weight updates per M-step (the paper: 5).
    target_accept: HMC acceptance rate aimed at (the paper: 0.9).
    adapt_rate: gain of the step-size adaptation.

  Returns:
    (state, metrics): "log_joint" (batch mean log p(x, z) after the E-step),
    "log_joint_after_m_step", "loss", "accept_prob" and "step_size" (batch
    means).
  """
  z, step_size, info = e_step(
      rng, state.decoder_params, x, state.chain_z[indices],
      state.step_size[indices], model_config=model_config,
      num_leapfrog=num_leapfrog, num_transitions=num_transitions,
      target_accept=target_accept, adapt_rate=adapt_rate)
  decoder_params, opt_state, m_metrics = m_step(
      state.decoder_params, state.opt_state, x, z, model_config=model_config,
      tx=tx, num_updates=num_updates, weight_prior_std=weight_prior_std,
      num_train=num_train)
  new_state = MCEMState(
      step=state.step + 1, decoder_params=decoder_params, opt_state=opt_state,
      chain_z=state.chain_z.at[indices].set(z),
      step_size=state.step_size.at[indices].set(step_size))
  metrics = {
      "log_joint": m_metrics["log_joint_before"],
      "log_joint_after_m_step": m_metrics["log_joint_after"],
      "loss": m_metrics["loss"],
      "accept_prob": jnp.mean(info["accept_prob"]),
      "step_size": jnp.mean(step_size),
  }
  return new_state, metrics


def make_mcem_train_step(
    model_config: models.ModelConfig, config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation, num_train: int, **mcem_kwargs,
) -> Callable[[MCEMState, dict], tuple[MCEMState, Metrics]]:
  """`train_step(state, batch) -> (state, metrics)` for Monte Carlo EM.

  Like `train.make_train_step`: the key is `fold_in(fold_in(key(seed), 0),
  step)` and dynamic binarization and the weight prior come from `config`.
  `batch` holds "image" [B, *data_shape] and "index" [B], the rows of the
  training set, which pick the persistent chains.

  Args:
    model_config: the VAE's shapes.
    config: an experiment config (reads seed, data.dynamic_binarization,
      objective.weight_prior_std).
    tx: the M-step optimizer.
    num_train: N.
    **mcem_kwargs: further `mcem_step` arguments (num_leapfrog, ...).

  Returns:
    The step function.
  """
  train_key = random_streams.key(config.seed, random_streams.Stream.TRAIN)
  dynamic_binarization = config.data.dynamic_binarization
  step_fn = functools.partial(
      mcem_step, model_config=model_config, tx=tx, num_train=num_train,
      weight_prior_std=config.objective.weight_prior_std, **mcem_kwargs)

  def train_step(state: MCEMState, batch: dict) -> tuple[MCEMState, Metrics]:
    rng = jax.random.fold_in(train_key, state.step)
    hmc_rng, binarize_rng = jax.random.split(rng)
    x = batch["image"].reshape(batch["image"].shape[0], -1)  # [B, D]
    if dynamic_binarization:
      x = jax.random.bernoulli(binarize_rng, x).astype(x.dtype)
    return step_fn(state, x, batch["index"], hmc_rng)

  return train_step
