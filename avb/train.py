"""The AEVB algorithm (Kingma & Welling 2013, algorithm 1): training and evaluation.

One pure `train_step(state, batch) -> (state, metrics)` does the work. Around
it:

  * `make_device_steps` runs many steps per dispatch (`lax.scan`) on a
    training set that lives on the devices: the epoch's shuffling and the
    minibatch slicing happen inside the compiled program, and metrics are
    summed on device;
  * `TrainLoop` drives either that, or single steps fed by a prefetching host
    pipeline for datasets too large for device memory;
  * `train_and_evaluate(config, workdir)` loads data, evaluates, logs,
    checkpoints and resumes.

Data parallelism is `jit` over a 1-D `Mesh`: the batch is sharded over the
"data" axis and everything else is replicated, so the same code runs on one
CPU, several GPUs, a TPU slice or several hosts (see `avb.distributed`).

Sweeps over seeds or numeric hyperparameters train R runs in one compiled
program: the state gets a leading axis of size R and the step is `vmap`ped
over it; the learning rate lives in the optimizer state
(`optax.inject_hyperparams`) and objective weights in `state.hyper`, so they
can differ per run.

Determinism: a run's noise key is `fold_in(key(seed), 0)` folded with the
step, and its minibatches depend on (seed, epoch, shard) only (see
`avb.input_pipeline`); a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import pathlib
import textwrap
import time
from typing import Any, Callable

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from avb import random_streams
from avb import config_utils
from avb import distributions
from avb import estimators
from avb import families
from avb import input_pipeline
from avb import models
from avb import writers

PyTree = Any
Metrics = dict[str, jax.Array]

# How many dispatches may run ahead of the host (see TrainLoop.run).
_MAX_IN_FLIGHT = 2

# Kept for callers of the previous API.
to_global = input_pipeline.to_global


class NonFiniteError(RuntimeError):
  """The loss or a gradient became NaN or infinite."""


class TrainState(flax.struct.PyTreeNode):
  """Everything a training run needs to continue exactly where it stopped.

  Attributes:
    step: number of updates applied so far.
    params: the VAE's parameters {"encoder": ..., "decoder": ...}.
    opt_state: the optimizer's state (Adagrad's accumulators, and the
      learning rate, injected so that it can differ between swept runs).
    bad_step: -1, or the first step whose loss or gradient was not finite.
      From that step on no update is applied, so `params` stay the last good
      ones and the host can stop the run naming the step.
    seed: the run's seed; its keys are derived from it inside the step, so
      swept runs with different seeds share one program.
    hyper: the objective's numeric weights (float32 scalars by name), read by
      the loss; a sweep gives each run its own values.
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  bad_step: jax.Array
  seed: jax.Array
  hyper: dict[str, jax.Array]


# ----------------------------------------------------------------------------
# The objective.


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Builds the optimizer named by `config.optimizer` (adagrad, adam or sgd).

  Its hyperparameters are injected into the optimizer state, so a sweep can
  set a different learning rate per run (`set_learning_rate`).
  """
  if config.name == "adagrad":
    # initial_accumulator_value=0 is the paper's (and PyTorch's) Adagrad;
    # optax's default is 0.1. optax skips the division while the
    # accumulator is exactly 0, so 0 is safe.
    return optax.inject_hyperparams(optax.adagrad)(
        learning_rate=config.learning_rate,
        initial_accumulator_value=config.initial_accumulator_value,
        eps=config.eps)
  if config.name == "adam":
    return optax.inject_hyperparams(optax.adam)(
        learning_rate=config.learning_rate, b1=config.b1, b2=config.b2,
        eps=config.eps)
  if config.name == "sgd":
    return optax.inject_hyperparams(optax.sgd)(learning_rate=config.learning_rate)
  raise config_utils.ConfigError(
      f"config.optimizer.name={config.name!r} is invalid: allowed: "
      f"{', '.join(config_utils.OPTIMIZERS)}")


def set_learning_rate(opt_state: PyTree, learning_rate: jax.Array) -> PyTree:
  """The optimizer state with its injected learning rate replaced."""
  hyperparams = dict(opt_state.hyperparams)
  hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
  return opt_state._replace(hyperparams=hyperparams)


def weight_log_prior(params: PyTree, std: float | jax.Array) -> jax.Array:
  """log N(params; 0, std^2 I), up to its constant; 0 when std is 0 (no prior)."""
  squares = sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))
  std = jnp.asarray(std, jnp.float32)
  safe_std = jnp.where(std > 0, std, 1.0)
  return jnp.where(std > 0, -0.5 * squares / safe_std**2, 0.0)


def objective_hyperparameters(objective: ml_collections.ConfigDict) -> dict[str, float]:
  """The objective's float fields: what `state.hyper` holds and sweeps may vary."""
  return {name: float(value) for name, value in objective.items()
          if isinstance(value, float)}


def encode(model_config: models.ModelConfig, params: PyTree,
           x: jax.Array) -> tuple[jax.Array, jax.Array, Callable]:
  """Runs the encoder on x [B, D] and binds the decoder's likelihood to x.

  Returns:
    (mean, log_var) of q(z|x), each [B, J], and `log_likelihood_fn`, which
    maps z [L, B, J] to log p(x|z) [L, B]: the form every estimator takes.
  """
  model = models.VAE(model_config)
  variables = {"params": params}
  mean, log_var = model.apply(variables, x, method=models.VAE.encode)

  def log_likelihood_fn(z):
    decoded = model.apply(variables, z, method=models.VAE.decode)
    return distributions.likelihood_log_prob(model_config.likelihood, x, decoded)

  return mean, log_var, log_likelihood_fn


def elbo_terms(model_config: models.ModelConfig, params: PyTree, x: jax.Array,
               rng: jax.Array, estimator: str, num_samples: int,
               posterior: str = "gaussian") -> Metrics:
  """Per-example ELBO terms of a batch, x: [B, D] flattened.

  Args:
    model_config: the model.
    params: its parameters.
    x: [B, D].
    rng: PRNG key.
    estimator: "A", "B" or "iwae" (the K-sample importance-weighted bound,
      K = num_samples, which adds "iwae" [B] to the terms).
    num_samples: L (or K).
    posterior: the variational family of q(z|x) (`avb.families`); the
      encoder's two outputs are its (loc, 2 * log_scale), so for "gaussian"
      they are (mean, log_var).

  Returns:
    The estimator's dict: "elbo", "reconstruction", "kl" [B],
    "kl_per_latent" [B, J], "z" [L, B, J], plus the encoder's "mean" and
    "log_var" [B, J].
  """
  mean, log_var, log_likelihood_fn = encode(model_config, params, x)
  if estimator == "iwae":
    terms = families.iwae_terms(posterior, rng, mean, 0.5 * log_var,
                                log_likelihood_fn, num_samples)
  elif posterior == "gaussian":
    terms = estimators.elbo_terms(estimator, rng, mean, log_var,
                                  log_likelihood_fn, num_samples)
  else:
    terms = families.elbo_terms_family(posterior, estimator, rng, mean,
                                       0.5 * log_var, log_likelihood_fn,
                                       num_samples)
  return {**terms, "mean": mean, "log_var": log_var}


def eval_estimator(posterior: str) -> str:
  """The test-ELBO estimator: B where the family's KL is closed-form, else A."""
  return "B" if families.get_family(posterior).has_closed_form_kl else "A"


def loss_fn(params: PyTree, x: jax.Array, rng: jax.Array,
            hyper: dict[str, jax.Array], *,
            model_config: models.ModelConfig,
            objective: ml_collections.ConfigDict,
            num_train: int,
            posterior: str = "gaussian") -> tuple[jax.Array, Metrics]:
  """The AEVB objective of one minibatch, negated for minimisation.

  loss = -(mean_i ELBO(x_i) + log p(theta) / N): the MAP weight prior is
  spread over the N training points, so the loss stays a per-datapoint bound.
  With estimator "iwae" the K-sample importance-weighted bound replaces the
  ELBO (and is logged as "iwae_bound"). `hyper["weight_prior_std"]` overrides
  the config's value (sweeps).
  """
  terms = elbo_terms(model_config, params, x, rng, objective.estimator,
                     objective.num_samples, posterior)
  elbo = jnp.mean(terms["elbo"])
  bound = jnp.mean(terms["iwae"]) if "iwae" in terms else elbo
  log_prior = weight_log_prior(
      params, hyper.get("weight_prior_std", objective.weight_prior_std))
  loss = -(bound + log_prior / num_train)
  metrics = {
      "loss": loss,
      "elbo": elbo,
      "reconstruction": jnp.mean(terms["reconstruction"]),
      "kl": jnp.mean(terms["kl"]),
      "kl_per_latent": jnp.mean(terms["kl_per_latent"], axis=0),  # [J]
      "weight_log_prior": log_prior,
  }
  if "iwae" in terms:
    metrics["iwae_bound"] = bound
  return loss, metrics


def aevb_loss(model_config: models.ModelConfig,
              config: ml_collections.ConfigDict, num_train: int) -> Callable:
  """`loss(params, x, rng, hyper) -> (loss, metrics)` of the AEVB objective."""
  return functools.partial(loss_fn, model_config=model_config,
                           objective=config.objective, num_train=num_train,
                           posterior=config.model.get("posterior", "gaussian"))


def _global_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------
# The step.


def create_train_state(model_config: models.ModelConfig,
                       tx: optax.GradientTransformation,
                       seed: int | jax.Array,
                       hyper: dict[str, float] | None = None,
                       learning_rate: float | jax.Array | None = None) -> TrainState:
  """A fresh state; pure in `seed`, so `vmap` over seeds builds a sweep's."""
  seed = jnp.asarray(seed, jnp.int32)
  params = models.init_params(
      model_config, random_streams.key(seed, random_streams.Stream.INIT))
  opt_state = tx.init(params)
  if learning_rate is not None:
    opt_state = set_learning_rate(opt_state, learning_rate)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=opt_state, bad_step=jnp.full((), -1, jnp.int32),
                    seed=seed,
                    hyper={k: jnp.asarray(v, jnp.float32)
                           for k, v in (hyper or {}).items()})


def make_train_step(loss: Callable, tx: optax.GradientTransformation, *,
                    dynamic_binarization: bool = False,
                    ) -> Callable[[TrainState, dict], tuple[TrainState, Metrics]]:
  """Returns the pure `train_step(state, batch) -> (state, metrics)`.

  Args:
    loss: `loss(params, x [B, D], rng, hyper) -> (scalar, metrics)`, e.g.
      `aevb_loss(...)`.
    tx: the optimizer.
    dynamic_binarization: resample binary pixels from the grey levels.

  `batch["image"]` is [B, *data_shape] in [0, 1]. The step's randomness is
  `fold_in(fold_in(key(state.seed), 0), state.step)`: nothing random is
  threaded through the Python loop.
  """

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, Metrics]:
    train_key = random_streams.key(state.seed, random_streams.Stream.TRAIN)
    rng = jax.random.fold_in(train_key, state.step)
    noise_rng, binarize_rng = jax.random.split(rng)
    x = batch["image"].reshape(batch["image"].shape[0], -1)  # [B, D]
    if dynamic_binarization:
      x = jax.random.bernoulli(binarize_rng, x).astype(x.dtype)
    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(
        state.params, x, noise_rng, state.hyper)
    # One sum of squares per leaf serves the log and the finiteness check:
    # the norm is finite iff every gradient entry is finite (barring
    # overflow of huge finite values, which is as bad). On XLA:CPU every
    # per-leaf reduction is a separate kernel, so this matters for speed.
    l2_grads = _global_norm(grads)
    ok = ((state.bad_step < 0) & jnp.isfinite(metrics["loss"])
          & jnp.isfinite(l2_grads))

    def apply_update(_):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      return optax.apply_updates(state.params, updates), opt_state

    def keep(_):
      return state.params, state.opt_state

    # A non-finite loss or gradient must not reach the parameters: keep the
    # last good state and remember the step, so the host can stop the run
    # with a message and the last checkpoint stays valid. (Under vmap the
    # cond becomes a select.)
    params, opt_state = jax.lax.cond(ok, apply_update, keep, None)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        bad_step=jnp.where(ok | (state.bad_step >= 0), state.bad_step,
                           state.step))
    metrics["l2_grads"] = l2_grads
    # The norm of the parameters the step was computed at: the same sums of
    # squares as the weight prior's, which XLA computes once.
    metrics["l2_params"] = _global_norm(state.params)
    return new_state, metrics

  return train_step


def make_device_steps(train_step: Callable, mesh: jax.sharding.Mesh, *,
                      batch_size: int, per_shard: int,
                      num_runs: int | None = None) -> Callable:
  """Many training steps per dispatch on a device-resident training set.

  Returns `steps(state, data, start_step, num_steps) -> (state, metric_sums)`,
  jitted with the state donated; `data` is `input_pipeline.device_dataset`'s
  [S, n, ...] array, `start_step` the host's count (equal to `state.step`),
  and `num_steps` static. Each epoch's permutations are drawn inside the
  program when the epoch starts and carried between steps; the metrics of
  the `num_steps` steps come back summed.

  With `num_runs`, the state has a leading axis of that size and the steps
  are vmapped over it; the data is shared.
  """
  num_shards = mesh.size
  per_shard_batch = batch_size // num_shards
  steps_per_epoch = per_shard // per_shard_batch
  replicated, sharded = shardings(mesh)

  def run(state, data, start_step, num_steps):
    shard_ids = jnp.arange(num_shards)

    def permutations_at(step):
      perms = input_pipeline.epoch_permutations(
          state.seed, step // steps_per_epoch, shard_ids, per_shard)
      return jax.lax.with_sharding_constraint(perms, sharded)

    def body(carry, offset):
      state, perms = carry
      # `start_step + offset` is the same for every swept run, so under vmap
      # the cond stays a branch: permutations are drawn once per epoch.
      step = start_step + offset
      position = step % steps_per_epoch
      perms = jax.lax.cond(position == 0, lambda: permutations_at(step),
                           lambda: perms)
      batch = input_pipeline.gather_batch(data, perms, position, per_shard_batch)
      batch = jax.lax.with_sharding_constraint(batch, sharded)
      state, metrics = train_step(state, {"image": batch})
      return (state, perms), metrics

    (state, _), metrics = jax.lax.scan(
        body, (state, permutations_at(start_step)),
        jnp.arange(num_steps, dtype=jnp.int32))
    return state, jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)

  if num_runs is not None:
    single = run
    run = lambda state, data, start, n: jax.vmap(  # pylint: disable=g-long-lambda
        lambda s: single(s, data, start, n))(state)

  return jax.jit(run, static_argnums=3, donate_argnums=0,
                 in_shardings=(replicated, sharded, replicated),
                 out_shardings=(replicated, replicated))


def make_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over `devices` (default: all, process-major)."""
  devices = devices if devices is not None else jax.devices()
  return jax.sharding.Mesh(np.asarray(devices), ("data",))


def shardings(mesh: jax.sharding.Mesh) -> tuple[jax.sharding.NamedSharding,
                                                  jax.sharding.NamedSharding]:
  """(replicated, batch-sharded) shardings on `mesh`."""
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  return (jax.sharding.NamedSharding(mesh, P()),
          jax.sharding.NamedSharding(mesh, P("data")))


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh,
                   num_runs: int | None = None) -> Callable:
  """jit with the state replicated and donated and the batch sharded.

  With `num_runs`, the step is vmapped over the state's leading axis and the
  batch is shared by the runs.
  """
  replicated, sharded = shardings(mesh)
  if num_runs is not None:
    train_step = jax.vmap(train_step, in_axes=(0, None))
  return jax.jit(train_step, in_shardings=(replicated, sharded),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


# ----------------------------------------------------------------------------
# Evaluation.


def make_eval_fns(model_config: models.ModelConfig,
                  config: ml_collections.ConfigDict,
                  mesh: jax.sharding.Mesh,
                  num_runs: int | None = None) -> tuple[Callable, Callable]:
  """Jitted batch evaluators: (ELBO sums, importance log-likelihood sums).

  Each takes (params, x [B, D], mask [B], rng, index) and returns masked
  sums over the batch, so padded final batches count exactly once; the
  batch's key is `fold_in(rng, index)`. With `num_runs`, params and rng have
  a leading run axis and so do the sums.
  """
  replicated, sharded = shardings(mesh)
  in_shardings = (replicated, sharded, sharded, replicated, replicated)
  eval_config = config.eval
  posterior = config.model.get("posterior", "gaussian")

  def elbo_sums(params, x, mask, rng, index):
    terms = elbo_terms(model_config, params, x, jax.random.fold_in(rng, index),
                       eval_estimator(posterior), eval_config.num_samples,
                       posterior)
    return {
        "elbo": jnp.sum(terms["elbo"] * mask),
        "reconstruction": jnp.sum(terms["reconstruction"] * mask),
        "kl": jnp.sum(terms["kl"] * mask),
        "kl_per_latent": jnp.sum(terms["kl_per_latent"] * mask[:, None], axis=0),
        "count": jnp.sum(mask),
    }

  def log_likelihood_sums(params, x, mask, rng, index):
    mean, log_var, log_likelihood_fn = encode(model_config, params, x)
    chunk_size = min(eval_config.log_likelihood_chunk,
                     eval_config.log_likelihood_samples)
    rng = jax.random.fold_in(rng, index)
    if posterior == "gaussian":
      log_px = estimators.importance_log_likelihood(
          rng, mean, log_var, log_likelihood_fn,
          eval_config.log_likelihood_samples, chunk_size)
    else:
      log_px = families.importance_log_likelihood_family(
          posterior, rng, mean, 0.5 * log_var, log_likelihood_fn,
          eval_config.log_likelihood_samples, chunk_size)
    return {"log_likelihood": jnp.sum(log_px * mask),
            "log_likelihood_sq": jnp.sum(jnp.square(log_px) * mask),
            "count": jnp.sum(mask)}

  def compile_(fn):
    if num_runs is not None:
      fn = jax.vmap(fn, in_axes=(0, None, None, 0, None))
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=replicated)

  return compile_(elbo_sums), compile_(log_likelihood_sums)


def evaluate(batch_fn: Callable, params: PyTree, images: np.ndarray,
             batch_size: int, rng: jax.Array,
             sharding: jax.sharding.NamedSharding, *,
             progress: str | None = None,
             progress_every_s: float = 15.0) -> dict[str, np.ndarray]:
  """Runs a masked-sum batch evaluator over `images` and returns the totals.

  Every process holds the whole split and evaluates its own contiguous block
  of it, `batch_size / process_count` examples per batch; short blocks and
  the last batch are padded and masked out, so every example counts once
  whatever N is.

  Args:
    batch_fn: `(params, x, mask, rng, batch_index) -> sums`.
    params: the parameters evaluated.
    images: the whole split [N, ...].
    batch_size: global examples per batch.
    rng: the evaluation key; `batch_fn` folds in the batch index.
    sharding: the batch sharding.
    progress: a name for a console line every `progress_every_s` seconds
      (images done, ETA), for evaluations long enough to look stuck, such
      as the importance-sampled log-likelihood; None prints nothing.
    progress_every_s: seconds between progress lines.
  """
  processes, index = jax.process_count(), jax.process_index()
  n = images.shape[0]
  block = -(-n // processes)
  # A view, not a copy: this runs at every evaluation on the whole split.
  x = images[index * block:(index + 1) * block]
  x = x.reshape(x.shape[0], -1).astype(np.float32, copy=False)
  local_batch = batch_size // processes
  num_batches = -(-block // local_batch)
  totals = None
  in_flight = collections.deque()
  start = last_report = time.time()
  for batch_index in range(num_batches):
    chunk = x[batch_index * local_batch:(batch_index + 1) * local_batch]
    mask = np.ones(len(chunk), np.float32)
    if len(chunk) < local_batch:
      pad = local_batch - len(chunk)
      chunk = np.concatenate([chunk, np.zeros((pad, x.shape[1]), np.float32)])
      mask = np.concatenate([mask, np.zeros(pad, np.float32)])
    sums = batch_fn(params, to_global(chunk, sharding), to_global(mask, sharding),
                    rng, jnp.int32(batch_index))
    totals = sums if totals is None else _accumulate(totals, sums)
    in_flight.append(sums["count"])
    if len(in_flight) > _MAX_IN_FLIGHT:  # see TrainLoop.run
      in_flight.popleft().block_until_ready()
      now = time.time()
      if progress is not None and now - last_report >= progress_every_s:
        last_report = now
        done = min((batch_index + 1 - len(in_flight)) * local_batch, block)
        eta = (now - start) * (block - done) / max(done, 1)
        logging.info("%s: %s/%s images, ETA %s", progress, f"{done:,}",
                     f"{block:,}", writers.format_duration(eta))
  return jax.tree.map(np.asarray, jax.device_get(totals))


def elbo_summary(sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  count = sums["count"]
  return {k: v / (count if np.ndim(v) == np.ndim(count) else count[..., None])
          for k, v in sums.items() if k != "count"}


def log_likelihood_summary(sums: dict[str, np.ndarray]) -> dict[str, float]:
  count = float(sums["count"])
  mean = float(sums["log_likelihood"]) / count
  variance = max(float(sums["log_likelihood_sq"]) / count - mean**2, 0.0)
  return {"log_likelihood": mean,
          "log_likelihood_stderr": math.sqrt(variance / count)}


# ----------------------------------------------------------------------------
# The host side of the loop.


class TrainLoop:
  """Feeds the compiled steps and sums their metrics on device.

  Two ways to feed them:

    * `device_steps` (from `make_device_steps`) with `data` on the devices:
      one dispatch per `steps_per_call` steps, no host work per step;
    * `train_step` (from `jit_train_step`) with a `prefetcher`
      (`input_pipeline.Prefetcher`) that streams host minibatches.

  `run(stop)` trains up to step `stop` without waiting on the device, except
  to keep at most `_MAX_IN_FLIGHT` dispatches queued. `self.state` is updated
  after every dispatch, so whoever catches an interruption holds the latest
  state. `benchmarks/train_throughput.py` times this same method.
  """

  def __init__(self, state: TrainState, step: int, *,
               device_steps: Callable | None = None,
               data: jax.Array | None = None,
               train_step: Callable | None = None,
               prefetcher: input_pipeline.Prefetcher | None = None,
               steps_per_call: int = 1):
    if (device_steps is None) == (train_step is None):
      raise ValueError("give either device_steps and data, or train_step and "
                       "prefetcher")
    self.state = state
    self.step = step  # a host int: reading state.step would wait on the device
    self._device_steps = device_steps
    self._data = data
    self._train_step = train_step
    self._prefetcher = prefetcher
    self._steps_per_call = steps_per_call
    self._sums = None
    self._num_summed = 0
    self._in_flight = collections.deque()

  def run(self, stop: int) -> None:
    """Runs steps self.step .. stop - 1."""
    while self.step < stop:
      if self._device_steps is not None:
        count = min(self._steps_per_call, stop - self.step)
        self.state, sums = self._device_steps(
            self.state, self._data, jnp.int32(self.step), count)
      else:
        count = 1
        self.state, sums = self._train_step(
            self.state, {"image": self._prefetcher.get(self.step)})
      self.step += count
      self._sums = sums if self._sums is None else _accumulate(self._sums, sums)
      self._num_summed += count
      # Bound the number of dispatched-but-unfinished programs. XLA's CPU
      # client aborts ("Termination timeout for all reduce") when dozens of
      # multi-device steps queue up; waiting on one a little behind costs
      # nothing on any backend, since the device is busy with the next ones.
      self._in_flight.append(jax.tree.leaves(sums)[0])
      if len(self._in_flight) > _MAX_IN_FLIGHT:
        self._in_flight.popleft().block_until_ready()

  def pop_metrics(self) -> dict[str, np.ndarray]:
    """Mean metrics over the steps since the last call (fetches once)."""
    sums = jax.device_get(self._sums)
    means = {k: np.asarray(v) / self._num_summed for k, v in sums.items()}
    self._sums, self._num_summed = None, 0
    return means

  def block_until_ready(self) -> None:
    jax.block_until_ready((self.state, self._sums))


@jax.jit
def _accumulate(total: Metrics, metrics: Metrics) -> Metrics:
  return jax.tree.map(jnp.add, total, metrics)


# ----------------------------------------------------------------------------
# Sweeps.


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a (possibly one-run) sweep: its label, seed and values."""
  label: str
  seed: int
  learning_rate: float
  hyper: dict[str, float]


def sweep_runs(config: ml_collections.ConfigDict) -> tuple[list[Run], bool]:
  """The runs a config asks for, and whether they form a vmapped sweep.

  `config.sweep.axis` names what varies ("seed", "optimizer.learning_rate"
  or "objective.<float field>") and `config.sweep.grid` its values; unset,
  the config is a single run.
  """
  base_hyper = objective_hyperparameters(config.objective)
  base = Run("run", int(config.seed), float(config.optimizer.learning_rate),
             base_hyper)
  sweep = config.get("sweep")
  if sweep is None or sweep.get("axis") is None:
    return [base], False
  axis, values = sweep.axis, tuple(sweep.grid)
  runs = []
  for value in values:
    label = f"{axis.rsplit('.', 1)[-1]}={value:g}"
    if axis == "seed":
      runs.append(dataclasses.replace(base, label=label, seed=int(value)))
    elif axis == "optimizer.learning_rate":
      runs.append(dataclasses.replace(base, label=label,
                                      learning_rate=float(value)))
    else:
      name = axis.split(".", 1)[1]
      runs.append(dataclasses.replace(base, label=label,
                                      hyper={**base_hyper, name: float(value)}))
  return runs, True


def create_states(runs: list[Run], swept: bool,
                  model_config: models.ModelConfig,
                  tx: optax.GradientTransformation) -> TrainState:
  """The initial state of one run, or of all runs stacked on a leading axis."""
  if not swept:
    run = runs[0]
    return create_train_state(model_config, tx, run.seed, run.hyper)
  seeds = jnp.asarray([r.seed for r in runs], jnp.int32)
  rates = jnp.asarray([r.learning_rate for r in runs], jnp.float32)
  hyper = {k: jnp.asarray([r.hyper[k] for r in runs], jnp.float32)
           for k in runs[0].hyper}
  return jax.jit(jax.vmap(functools.partial(create_train_state, model_config, tx)))(
      seeds, hyper, rates)


# ----------------------------------------------------------------------------
# Checkpoints.


def checkpoint_manager(workdir: pathlib.Path, max_to_keep: int):
  """An orbax CheckpointManager for `workdir/checkpoints`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def restore_checkpoint(manager, step: int, target: TrainState) -> TrainState:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def resume(manager, step: int, target: TrainState, workdir: str, *,
           announce: bool = True) -> TrainState:
  """`restore_checkpoint`; a checkpoint of another config is a one-line error.

  Every entry point resumes through this, so a --workdir written by a
  different model is refused the same way everywhere. `announce=False` is
  for callers whose start-up block already says that the run resumed.

  Raises:
    config_utils.ConfigError: the checkpoint's tree does not fit `target`.
  """
  try:
    state = restore_checkpoint(manager, step, target)
  except Exception as e:  # orbax raises many types for a mismatched tree.
    raise config_utils.ConfigError(
        f"--workdir={workdir} holds a checkpoint (step {step}) that does "
        f"not fit this config ({type(e).__name__}); use a new --workdir or "
        "the config that wrote it") from None
  if announce:
    logging.info("Resumed from %s at step %d.", manager.directory, step)
  return state


def save_checkpoint(manager, state: TrainState) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # Every process calls this; orbax writes each array once and agrees on
  # completion across processes.
  manager.save(int(state.step.reshape(-1)[0]), args=ocp.args.StandardSave(state),
               force=True)


def _check_checkpoint_compatible(workdir: pathlib.Path,
                                 config: ml_collections.ConfigDict,
                                 state: TrainState) -> None:
  """Refuses to resume from a checkpoint written for a different model.

  Compares the parameter shapes recorded in `workdir/run_info.json` with the
  ones this config builds, so the message names what differs.
  """
  info_path = workdir / "run_info.json"
  if not info_path.exists():
    return
  saved = json.loads(info_path.read_text())
  expected = _param_shapes(state.params)
  if saved.get("param_shapes") != expected or saved.get("optimizer") != config.optimizer.name:
    differ = sorted(k for k in set(expected) | set(saved.get("param_shapes", {}))
                    if expected.get(k) != saved.get("param_shapes", {}).get(k))
    detail = (f"parameter shapes differ at {', '.join(differ[:3])}" if differ
              else f"optimizer {saved.get('optimizer')!r} != {config.optimizer.name!r}")
    raise config_utils.ConfigError(
        f"--workdir={workdir} holds a checkpoint of a different model "
        f"({detail}; it was written for {saved.get('model')}); use a new "
        "--workdir or the config that wrote it")


def _param_shapes(params: PyTree) -> dict[str, list[int]]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(path): list(leaf.shape) for path, leaf in flat}


# ----------------------------------------------------------------------------
# The run.


def _run_slice(tree: PyTree, index: int | None) -> PyTree:
  return tree if index is None else jax.tree.map(lambda x: x[index], tree)


def start_block(config: ml_collections.ConfigDict, dataset,
                model_config: models.ModelConfig, mesh: jax.sharding.Mesh,
                workdir: pathlib.Path, *, num_train: int, per_shard: int,
                resumed_step: int | None, num_runs: int) -> str:
  """What a run is about to do, printed once at its start, a fact a line.

  Args:
    config: the run's config.
    dataset: the loaded `data.Dataset` (its `describe()` names the sources).
    model_config: the model built.
    mesh: the device mesh.
    workdir: the run's directory.
    num_train: training examples used (a multiple of the shard count).
    per_shard: training examples on each device.
    resumed_step: the checkpoint's step when resuming, else None.
    num_runs: runs trained together (a sweep), else 1.

  Returns:
    Lines, the first naming the run; data lines wrap at 110 characters.
  """
  total = dataset.train.images.shape[0]
  used = (f"{num_train:,} examples" if num_train == total else
          f"{num_train:,} of {total:,} examples ({mesh.size} equal shards)")
  devices = mesh.devices.reshape(-1)
  widths = "-".join(str(w) for w in (model_config.data_dim,
                                     *model_config.hidden_sizes,
                                     model_config.num_latents))
  lines = [
      f"AEVB run: {config.data.name}, {config.training.num_steps:,} steps",
      *(textwrap.fill(line, 110, initial_indent="  data      ",
                      subsequent_indent=" " * 14)
        for line in dataset.describe().splitlines()),
      f"  training  {used}, batch {config.training.batch_size}, "
      f"{config.optimizer.name} lr {config.optimizer.learning_rate:g}, "
      f"estimator {config.objective.estimator}"
      + (f", {num_runs} runs ({config.sweep.axis})" if num_runs > 1 else ""),
      f"  model     {model_config.architecture} {widths} "
      f"{model_config.activation}, {model_config.likelihood} decoder, "
      f"{config.model.get('posterior', 'gaussian')} posterior",
      f"  devices   {len(devices)} x {devices[0].platform}, "
      f"{jax.process_count()} process(es), {per_shard:,} examples per device",
      f"  workdir   {workdir} ("
      + (f"resumed at step {resumed_step:,})" if resumed_step is not None
         else "new run)"),
  ]
  return "\n".join(lines)


def final_line(summary: dict[str, Any]) -> str:
  """The run's headline numbers on one line."""
  parts = [f"[{summary['label']}]"] if "label" in summary else []
  parts.append(f"done at step {summary['steps']:,}: "
               f"test ELBO {summary['test_elbo']:.2f}, "
               f"train ELBO {summary['train_elbo']:.2f}")
  if "test_log_likelihood" in summary:
    parts.append(f"test log p(x) {summary['test_log_likelihood']:.2f} "
                 f"+- {summary['test_log_likelihood_stderr']:.2f}")
  if summary.get("non_finite_step") is not None:
    parts.append(f"non-finite at step {summary['non_finite_step']}")
  return ", ".join(parts)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains a VAE with AEVB, evaluating, logging and checkpointing to `workdir`.

  A run started on a workdir that holds a checkpoint resumes from its last
  step and continues the same minibatch and noise streams. A sweep
  (`config.sweep`) trains its runs together and writes each one's logs,
  images and summary under `workdir/sweep/<label>/`; the checkpoint holds
  them all, stacked.

  Args:
    config: an experiment config (see experiments/configs/mnist.py).
    workdir: where checkpoints, TensorBoard events, metrics.jsonl, images
      and summary.json go (written by process 0 only).

  Returns:
    The summary that is also written to `workdir/summary.json`.

  Raises:
    config_utils.ConfigError: a bad config value or an incompatible workdir.
    data.DataError: missing or malformed data.
    NonFiniteError: the loss or a gradient became NaN/inf (the last good
      checkpoint is kept). In a sweep, a run that diverges is frozen at its
      last good state and reported in its summary; the others go on.
  """
  from avb import data as data_lib  # pylint: disable=g-import-not-at-top

  wall_start = time.time()
  mesh = make_mesh()
  config_utils.validate_config(config, num_devices=mesh.size,
                               num_processes=jax.process_count())
  workdir_path = config_utils.check_workdir(workdir)
  runs, swept = sweep_runs(config)
  num_runs = len(runs) if swept else None

  dataset = data_lib.load_dataset(
      config.data.name, source=config.data.source,
      data_dir=config.data.data_dir, tfds_data_dir=config.data.tfds_data_dir,
      seed=config.seed, train_size=config.data.train_size,
      test_size=config.data.test_size)
  batch_size = config.training.batch_size
  num_shards = mesh.size
  per_shard = input_pipeline.shard_size(dataset.train.images.shape[0],
                                        num_shards, batch_size)
  num_train = per_shard * num_shards
  # This process keeps only the rows of its own shards.
  train_images = dataset.train.images[input_pipeline.process_rows(
      dataset.train.images.shape[0], num_shards)]
  test_images = dataset.test.images

  model_config = models.ModelConfig.from_config(config.model, dataset.image_shape)
  tx = make_optimizer(config.optimizer)
  replicated, sharded = shardings(mesh)
  state = jax.device_put(create_states(runs, swept, model_config, tx), replicated)

  manager = checkpoint_manager(workdir_path, config.training.max_checkpoints_to_keep)
  latest = manager.latest_step()
  if latest is not None:
    _check_checkpoint_compatible(workdir_path, config, state)
    state = resume(manager, latest, state, workdir, announce=False)
    summary_path = workdir_path / "summary.json"
    if latest >= config.training.num_steps and summary_path.exists():
      logging.info("Run already complete; its summary is %s.", summary_path)
      manager.close()
      return json.loads(summary_path.read_text())
  else:
    writers.write_json(workdir_path / "config.json", config.to_dict())
    writers.write_json(workdir_path / "run_info.json", {
        "model": dataclasses.asdict(model_config),
        "optimizer": config.optimizer.name,
        "param_shapes": _param_shapes(state.params),
        "runs": [dataclasses.asdict(r) for r in runs],
    })
  initial_step = latest if latest is not None else 0
  logging.info("%s", start_block(
      config, dataset, model_config, mesh, workdir_path, num_train=num_train,
      per_shard=per_shard, resumed_step=latest,
      num_runs=len(runs) if swept else 1))

  train_step = make_train_step(
      aevb_loss(model_config, config, num_train), tx,
      dynamic_binarization=config.data.dynamic_binarization)
  prefetcher = None
  if config.data.on_device:
    loop = TrainLoop(
        state, initial_step,
        device_steps=make_device_steps(train_step, mesh, batch_size=batch_size,
                                       per_shard=per_shard, num_runs=num_runs),
        data=input_pipeline.device_dataset(train_images, num_shards, sharded),
        steps_per_call=config.training.steps_per_call)
  else:
    order = input_pipeline.HostOrder(runs[0].seed, num_shards, per_shard,
                                     batch_size)
    prefetcher = input_pipeline.Prefetcher(train_images, order, sharded,
                                           initial_step)
    loop = TrainLoop(state, initial_step,
                     train_step=jit_train_step(train_step, mesh, num_runs),
                     prefetcher=prefetcher)
  steps_per_epoch = per_shard // (batch_size // num_shards)

  elbo_sums, log_likelihood_sums = make_eval_fns(model_config, config, mesh,
                                                 num_runs)
  eval_keys = [random_streams.key(r.seed, random_streams.Stream.EVAL)
               for r in runs]
  eval_key = jnp.stack(eval_keys) if swept else eval_keys[0]
  run_dirs = [workdir_path / "sweep" / r.label for r in runs] if swept else [workdir_path]
  loggers = []
  for run_dir in run_dirs:
    if jax.process_index() == 0:
      run_dir.mkdir(parents=True, exist_ok=True)
  for run, run_dir in zip(runs, run_dirs):
    loggers.append(writers.MetricLogger(
        run_dir, num_steps=config.training.num_steps,
        label=run.label if swept else None))
  indices = list(range(len(runs))) if swept else [None]
  num_steps = config.training.num_steps
  train_eval_images = dataset.train.images[:min(config.eval.train_examples, num_train)]
  reported_bad: set[int] = set()

  def check_finite() -> None:
    bad = np.asarray(loop.state.bad_step).reshape(-1)
    if not swept and bad[0] >= 0:
      last = manager.latest_step()
      raise NonFiniteError(
          f"non-finite loss or gradient at step {bad[0]}; stopped. The last "
          f"good checkpoint (step {last}) in {manager.directory} is intact. "
          "Try a smaller --config.optimizer.learning_rate.")
    for i in np.flatnonzero(bad >= 0):
      if i not in reported_bad:
        reported_bad.add(int(i))
        logging.warning("Run %s: non-finite loss or gradient at step %d; it "
                        "keeps its last good parameters.", runs[i].label, bad[i])

  def write_split(step: int, values: dict[str, np.ndarray], split: str) -> None:
    for logger, index in zip(loggers, indices):
      logger.write(step, _run_slice(values, index), split)

  def run_eval(step: int) -> dict[str, np.ndarray]:
    test = elbo_summary(evaluate(elbo_sums, loop.state.params, test_images,
                                 config.eval.batch_size, eval_key, sharded))
    write_split(step, test, "test")
    return test

  def periodic_checkpoint() -> None:
    check_finite()
    save_checkpoint(manager, loop.state)

  boundaries = (config.training.log_every, config.training.eval_every,
                config.training.checkpoint_every)
  interval_start, interval_step = time.time(), initial_step
  try:
    while loop.step < num_steps:
      # Run to the next step at which something is logged, evaluated or saved.
      loop.run(min([num_steps] + [(loop.step // k + 1) * k for k in boundaries]))
      done = loop.step
      if done % config.training.log_every == 0 or done == num_steps:
        check_finite()
        means = loop.pop_metrics()
        elapsed = time.time() - interval_start
        steps_per_sec = (done - interval_step) / max(elapsed, 1e-9)
        timing = dict(steps_per_sec=steps_per_sec,
                      examples_per_sec=steps_per_sec * batch_size * len(runs),
                      examples_seen=done * batch_size,
                      epoch=done / steps_per_epoch,
                      eta_seconds=(num_steps - done) / max(steps_per_sec, 1e-9))
        if prefetcher is not None:
          timing["input_wait_fraction"] = prefetcher.wait_seconds / max(elapsed, 1e-9)
          prefetcher.wait_seconds = 0.0
        for logger, index in zip(loggers, indices):
          logger.write(done, {**_run_slice(means, index), **timing}, "train")
        interval_start, interval_step = time.time(), done
      if done % config.training.eval_every == 0 and done != num_steps:
        run_eval(done)
      if done % config.training.checkpoint_every == 0 and done != num_steps:
        periodic_checkpoint()
  except KeyboardInterrupt:
    # Keep the work done so far: a restart on the same workdir resumes here.
    try:
      if loop.step > initial_step and (swept or int(loop.state.bad_step) < 0):
        save_checkpoint(manager, loop.state)
        manager.wait_until_finished()
        logging.warning("Interrupted: saved a checkpoint at step %d.", loop.step)
    except RuntimeError as e:  # Interrupted mid-dispatch: buffers donated.
      logging.warning("Interrupted; no new checkpoint (%s). The last one "
                      "stands.", e)
    raise
  finally:
    if prefetcher is not None:
      prefetcher.close()

  state = loop.state
  check_finite()
  final_step = loop.step
  if latest is None or final_step != latest:
    save_checkpoint(manager, state)
  manager.wait_until_finished()

  test = run_eval(final_step)
  train = elbo_summary(evaluate(elbo_sums, state.params, train_eval_images,
                                config.eval.batch_size, eval_key, sharded))
  write_split(final_step, train, "train_eval")
  ll_sums = None
  if config.eval.log_likelihood_samples > 0:
    ll_images = test_images
    if config.eval.log_likelihood_examples is not None:
      ll_images = test_images[:config.eval.log_likelihood_examples]
    ll_start = time.time()
    test_ll = random_streams.EvalStream.TEST_LOG_LIKELIHOOD
    ll_key = (jax.vmap(lambda k: random_streams.sub_key(k, test_ll))(eval_key)
              if swept else random_streams.sub_key(eval_key, test_ll))
    logging.info("Estimating the test log-likelihood: %d samples for each "
                 "of %s images.", config.eval.log_likelihood_samples,
                 f"{ll_images.shape[0]:,}")
    ll_sums = evaluate(log_likelihood_sums, state.params, ll_images,
                       config.eval.batch_size, ll_key, sharded,
                       progress="test log-likelihood")
    ll_seconds = time.time() - ll_start
  bad_steps = np.asarray(state.bad_step).reshape(-1)

  summaries = []
  for r, (run, logger, index) in enumerate(zip(runs, loggers, indices)):
    run_test, run_train = _run_slice(test, index), _run_slice(train, index)
    summary = {
        "dataset": config.data.name,
        "data_sources": {"train": dataset.train.source, "test": dataset.test.source},
        "num_train": num_train,
        "num_test": int(test_images.shape[0]),
        "num_latents": model_config.num_latents,
        "seed": run.seed,
        "learning_rate": run.learning_rate,
        "hyper": run.hyper,
        "steps": final_step,
        "examples_seen": final_step * batch_size,
        "resumed_from_step": initial_step if latest is not None else None,
        "train_elbo": float(run_train["elbo"]),
        "train_elbo_examples": int(train_eval_images.shape[0]),
        "test_elbo": float(run_test["elbo"]),
        "test_reconstruction": float(run_test["reconstruction"]),
        "test_kl": float(run_test["kl"]),
    }
    if swept:
      summary["label"] = run.label
      summary["non_finite_step"] = (int(bad_steps[r]) if bad_steps[r] >= 0
                                    else None)
    if ll_sums is not None:
      run_ll = log_likelihood_summary(_run_slice(ll_sums, index))
      logger.write(final_step, run_ll, "test")
      summary.update(test_log_likelihood=run_ll["log_likelihood"],
                     test_log_likelihood_stderr=run_ll["log_likelihood_stderr"],
                     log_likelihood_samples=config.eval.log_likelihood_samples,
                     log_likelihood_examples=int(ll_images.shape[0]),
                     log_likelihood_seconds=ll_seconds)
    _write_images(logger, final_step, model_config,
                  _run_slice(state.params, index), test_images,
                  config.eval.num_images,
                  random_streams.key(run.seed, random_streams.Stream.PICTURES))
    summary["wall_time_s"] = time.time() - wall_start
    summaries.append(summary)
    logger.flush()
    logger.close()

  if swept:
    for run_dir, summary in zip(run_dirs, summaries):
      writers.write_json(run_dir / "summary.json", summary)
    result = {"sweep": {"axis": config.sweep.axis,
                        "grid": list(config.sweep.grid)},
              "runs": summaries, "wall_time_s": time.time() - wall_start}
  else:
    result = summaries[0]
  writers.write_json(workdir_path / "summary.json", result)
  manager.close()
  for summary in summaries:
    logging.info("%s", final_line(summary))
  logging.info("Summary: %s", workdir_path / "summary.json")
  return result


def _write_images(logger, step: int, model_config: models.ModelConfig,
                  params: PyTree, images: np.ndarray, num_images: int,
                  rng: jax.Array) -> None:
  """Test reconstructions (originals above, means below) and prior samples."""
  model = models.VAE(model_config)
  variables = {"params": jax.device_get(params)}
  originals = images[:num_images]
  decoded = model.apply(variables, originals.reshape(len(originals), -1))
  reconstructions = models.decoder_mean(model_config.likelihood, decoded)
  columns = int(math.ceil(math.sqrt(num_images)))
  reconstructions = np.asarray(reconstructions).reshape(originals.shape)
  # Rows alternate: originals, then their reconstructions. A short last row
  # is padded with white so the pairs stay aligned.
  rows = []
  for start in range(0, len(originals), columns):
    for row in (originals[start:start + columns],
                reconstructions[start:start + columns]):
      pad = np.ones((columns - len(row), *row.shape[1:]), row.dtype)
      rows.append(np.concatenate([row, pad]))
  logger.write_images(step, "reconstructions", np.concatenate(rows), columns)
  z = jax.random.normal(rng, (num_images, model_config.num_latents))
  samples = models.decoder_mean(
      model_config.likelihood,
      model.apply(variables, z, method=models.VAE.decode))
  logger.write_images(step, "samples",
                      np.asarray(samples).reshape(-1, *model_config.data_shape),
                      columns)
