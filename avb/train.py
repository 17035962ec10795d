"""The AEVB algorithm (Kingma & Welling 2013, algorithm 1): training and evaluation.

One pure, jitted `train_step(state, batch) -> (state, metrics)` does all the
work; `train_and_evaluate(config, workdir)` feeds it minibatches, logs,
evaluates, checkpoints and resumes. Data parallelism is `jit` over a 1-D
`Mesh`: the batch is sharded over the "data" axis and everything else is
replicated, so the same code runs on one CPU, several GPUs or a TPU slice.

Determinism: the step's noise key is `fold_in(train_key, step)` and the
minibatch order is a permutation seeded by (seed, epoch); both derive from the
step number alone, so a run resumed from a checkpoint draws exactly the
minibatches and noise that the uninterrupted run would have.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, Callable

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from avb import config_utils
from avb import distributions
from avb import estimators
from avb import models

PyTree = Any
Metrics = dict[str, jax.Array]

# How many training steps may be dispatched ahead of the host (see the loop).
_MAX_STEPS_IN_FLIGHT = 4


class NonFiniteError(RuntimeError):
  """The loss or a gradient became NaN or infinite."""


class TrainState(flax.struct.PyTreeNode):
  """Everything a training run needs to continue exactly where it stopped.

  Attributes:
    step: number of updates applied so far.
    params: the VAE's parameters {"encoder": ..., "decoder": ...}.
    opt_state: the optimizer's state (Adagrad's accumulators, ...).
    bad_step: -1, or the first step whose loss or gradient was not finite.
      From that step on no update is applied, so `params` stay the last good
      ones and the host can stop the run naming the step.
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  bad_step: jax.Array


# ----------------------------------------------------------------------------
# The objective.


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Builds the optimizer named by `config.optimizer` (adagrad, adam or sgd)."""
  if config.name == "adagrad":
    # initial_accumulator_value=0 is the paper's (and PyTorch's) Adagrad;
    # optax's default is 0.1. optax skips the division while the
    # accumulator is exactly 0, so 0 is safe.
    return optax.adagrad(config.learning_rate,
                         initial_accumulator_value=config.initial_accumulator_value,
                         eps=config.eps)
  if config.name == "adam":
    return optax.adam(config.learning_rate, b1=config.b1, b2=config.b2,
                      eps=config.eps)
  if config.name == "sgd":
    return optax.sgd(config.learning_rate)
  raise config_utils.ConfigError(
      f"config.optimizer.name={config.name!r} is invalid: allowed: "
      f"{', '.join(config_utils.OPTIMIZERS)}")


def weight_log_prior(params: PyTree, std: float) -> jax.Array:
  """log N(params; 0, std^2 I), up to its constant (irrelevant to the MAP)."""
  if std == 0:
    return jnp.zeros((), jnp.float32)
  squares = sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))
  return -0.5 * squares / std**2


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
               rng: jax.Array, estimator: str, num_samples: int) -> Metrics:
  """Per-example ELBO terms of a batch, x: [B, D] flattened.

  Returns:
    The estimator's dict: "elbo", "reconstruction", "kl" [B],
    "kl_per_latent" [B, J], "z" [L, B, J], plus the encoder's "mean" and
    "log_var" [B, J].
  """
  mean, log_var, log_likelihood_fn = encode(model_config, params, x)
  terms = estimators.elbo_terms(estimator, rng, mean, log_var,
                                log_likelihood_fn, num_samples)
  return {**terms, "mean": mean, "log_var": log_var}


def loss_fn(params: PyTree, x: jax.Array, rng: jax.Array, *,
            model_config: models.ModelConfig,
            objective: ml_collections.ConfigDict,
            num_train: int) -> tuple[jax.Array, Metrics]:
  """The AEVB objective of one minibatch, negated for minimisation.

  loss = -(mean_i ELBO(x_i) + log p(theta) / N): the MAP weight prior is
  spread over the N training points, so the loss stays a per-datapoint bound.
  """
  terms = elbo_terms(model_config, params, x, rng, objective.estimator,
                     objective.num_samples)
  elbo = jnp.mean(terms["elbo"])
  log_prior = weight_log_prior(params, objective.weight_prior_std)
  loss = -(elbo + log_prior / num_train)
  metrics = {
      "loss": loss,
      "elbo": elbo,
      "reconstruction": jnp.mean(terms["reconstruction"]),
      "kl": jnp.mean(terms["kl"]),
      "kl_per_latent": jnp.mean(terms["kl_per_latent"], axis=0),  # [J]
      "weight_log_prior": log_prior,
  }
  return loss, metrics


def _global_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _all_finite(tree: PyTree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(tree)]))


# ----------------------------------------------------------------------------
# The step.


def create_train_state(model_config: models.ModelConfig,
                       tx: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
  params = models.init_params(model_config, rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params),
                    bad_step=jnp.full((), -1, jnp.int32))


def make_train_step(model_config: models.ModelConfig,
                    config: ml_collections.ConfigDict,
                    tx: optax.GradientTransformation,
                    num_train: int) -> Callable[[TrainState, dict], tuple[TrainState, Metrics]]:
  """Returns the pure `train_step(state, batch) -> (state, metrics)`.

  `batch["image"]` is [B, *data_shape] in [0, 1]. The step's randomness is
  `fold_in(train_key, state.step)`: nothing random is threaded through the
  Python loop.
  """
  train_key = jax.random.fold_in(jax.random.key(config.seed), 0)
  dynamic_binarization = config.data.dynamic_binarization
  objective = config.objective
  loss = functools.partial(loss_fn, model_config=model_config,
                           objective=objective, num_train=num_train)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(train_key, state.step)
    noise_rng, binarize_rng = jax.random.split(rng)
    x = batch["image"].reshape(batch["image"].shape[0], -1)  # [B, D]
    if dynamic_binarization:
      x = jax.random.bernoulli(binarize_rng, x).astype(x.dtype)
    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(
        state.params, x, noise_rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    # A non-finite loss or gradient must not reach the parameters: keep the
    # last good state and remember the step, so the host can stop the run
    # with a message and the last checkpoint stays valid.
    ok = (state.bad_step < 0) & jnp.isfinite(metrics["loss"]) & _all_finite(grads)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        bad_step=jnp.where(ok | (state.bad_step >= 0), state.bad_step,
                           state.step))
    metrics["l2_grads"] = _global_norm(grads)
    metrics["l2_params"] = _global_norm(new_state.params)
    return new_state, metrics

  return train_step


def make_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D data-parallel mesh over `devices` (default: all devices)."""
  devices = devices if devices is not None else jax.devices()
  return jax.sharding.Mesh(np.asarray(devices), ("data",))


def shardings(mesh: jax.sharding.Mesh) -> tuple[jax.sharding.NamedSharding,
                                                  jax.sharding.NamedSharding]:
  """(replicated, batch-sharded) shardings on `mesh`."""
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  return (jax.sharding.NamedSharding(mesh, P()),
          jax.sharding.NamedSharding(mesh, P("data")))


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """jit with the state replicated and donated and the batch sharded."""
  replicated, sharded = shardings(mesh)
  return jax.jit(train_step, in_shardings=(replicated, sharded),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def to_global(array: np.ndarray, sharding: jax.sharding.NamedSharding) -> jax.Array:
  """This process's slice of a batch -> the global, sharded jax.Array."""
  return jax.make_array_from_process_local_data(sharding, array)


# ----------------------------------------------------------------------------
# Evaluation.


def make_eval_fns(model_config: models.ModelConfig,
                  config: ml_collections.ConfigDict,
                  mesh: jax.sharding.Mesh) -> tuple[Callable, Callable]:
  """Jitted batch evaluators: (ELBO sums, importance log-likelihood sums).

  Each takes (params, x [B, D], mask [B], rng) and returns masked sums over
  the batch, so padded final batches count exactly once.
  """
  replicated, sharded = shardings(mesh)
  in_shardings = (replicated, sharded, sharded, replicated)
  eval_config = config.eval

  @functools.partial(jax.jit, in_shardings=in_shardings, out_shardings=replicated)
  def elbo_sums(params, x, mask, rng):
    terms = elbo_terms(model_config, params, x, rng, "B", eval_config.num_samples)
    return {
        "elbo": jnp.sum(terms["elbo"] * mask),
        "reconstruction": jnp.sum(terms["reconstruction"] * mask),
        "kl": jnp.sum(terms["kl"] * mask),
        "kl_per_latent": jnp.sum(terms["kl_per_latent"] * mask[:, None], axis=0),
        "count": jnp.sum(mask),
    }

  @functools.partial(jax.jit, in_shardings=in_shardings, out_shardings=replicated)
  def log_likelihood_sums(params, x, mask, rng):
    mean, log_var, log_likelihood_fn = encode(model_config, params, x)
    log_px = estimators.importance_log_likelihood(
        rng, mean, log_var, log_likelihood_fn,
        num_samples=eval_config.log_likelihood_samples,
        chunk_size=min(eval_config.log_likelihood_chunk,
                       eval_config.log_likelihood_samples))
    return {"log_likelihood": jnp.sum(log_px * mask),
            "log_likelihood_sq": jnp.sum(jnp.square(log_px) * mask),
            "count": jnp.sum(mask)}

  return elbo_sums, log_likelihood_sums


def evaluate(batch_fn: Callable, params: PyTree, images: np.ndarray,
             batch_size: int, rng: jax.Array,
             sharding: jax.sharding.NamedSharding) -> dict[str, np.ndarray]:
  """Runs a masked-sum batch evaluator over `images` and returns the totals.

  The last batch is padded to `batch_size` (a multiple of the device count)
  and masked out, so every example counts once whatever N is.
  """
  # A view, not a copy: this runs at every evaluation on the whole split.
  x = images.reshape(images.shape[0], -1).astype(np.float32, copy=False)
  n = x.shape[0]
  totals = None
  in_flight = collections.deque()
  for index, start in enumerate(range(0, n, batch_size)):
    chunk = x[start:start + batch_size]
    mask = np.ones(len(chunk), np.float32)
    if len(chunk) < batch_size:
      pad = batch_size - len(chunk)
      chunk = np.concatenate([chunk, np.zeros((pad, x.shape[1]), np.float32)])
      mask = np.concatenate([mask, np.zeros(pad, np.float32)])
    sums = batch_fn(params, to_global(chunk, sharding), to_global(mask, sharding),
                    jax.random.fold_in(rng, index))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    in_flight.append(sums["count"])
    if len(in_flight) > _MAX_STEPS_IN_FLIGHT:  # see the training loop
      in_flight.popleft().block_until_ready()
  return jax.tree.map(np.asarray, jax.device_get(totals))


def elbo_summary(sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  count = sums["count"]
  return {k: v / count for k, v in sums.items() if k != "count"}


def log_likelihood_summary(sums: dict[str, np.ndarray]) -> dict[str, float]:
  count = float(sums["count"])
  mean = float(sums["log_likelihood"]) / count
  variance = max(float(sums["log_likelihood_sq"]) / count - mean**2, 0.0)
  return {"log_likelihood": mean,
          "log_likelihood_stderr": math.sqrt(variance / count)}


# ----------------------------------------------------------------------------
# Data order.


class MinibatchOrder:
  """Which training examples make up the minibatch of each step.

  Epoch e is a permutation drawn from a generator seeded with (seed, e); a
  step's batch is a contiguous slice of it (the last incomplete batch of an
  epoch is dropped). A function of the step alone, hence resume-exact.
  """

  def __init__(self, num_examples: int, batch_size: int, seed: int):
    if batch_size > num_examples:
      raise config_utils.ConfigError(
          f"config.training.batch_size={batch_size} is larger than the "
          f"{num_examples} training examples; lower it or use more data")
    self.num_examples = num_examples
    self.batch_size = batch_size
    self.steps_per_epoch = num_examples // batch_size
    self._seed = seed
    self._cached_epoch = -1
    self._permutation = None

  def indices(self, step: int) -> np.ndarray:
    epoch, position = divmod(step, self.steps_per_epoch)
    if epoch != self._cached_epoch:
      rng = np.random.default_rng([self._seed, epoch])
      self._permutation = rng.permutation(self.num_examples)
      self._cached_epoch = epoch
    start = position * self.batch_size
    return self._permutation[start:start + self.batch_size]


class TrainLoop:
  """The host side of training: feeds `train_step` and sums its metrics.

  `run(stop)` trains up to step `stop`: it gathers each minibatch on the
  host, makes it a global sharded array, dispatches the jitted step and adds
  its metrics to an on-device sum, never waiting on the device except to keep
  at most `_MAX_STEPS_IN_FLIGHT` steps queued. `self.state` is updated after
  every step, so whoever catches an interruption holds the latest state.
  `benchmarks/train_throughput.py` times this same method.
  """

  def __init__(self, train_step: Callable, state: TrainState,
               images: np.ndarray, order: MinibatchOrder,
               sharding: jax.sharding.NamedSharding, step: int):
    self.train_step = train_step
    self.state = state
    self.step = step  # a host int: reading state.step would wait on the device
    self._images = images
    self._order = order
    self._sharding = sharding
    self._sums = None
    self._num_summed = 0
    self._in_flight = collections.deque()

  def run(self, stop: int) -> None:
    """Runs steps self.step .. stop - 1."""
    for step in range(self.step, stop):
      batch = {"image": to_global(self._images[self._order.indices(step)],
                                  self._sharding)}
      self.state, metrics = self.train_step(self.state, batch)
      self.step = step + 1
      if self._sums is None:
        self._sums = jax.tree.map(jnp.zeros_like, metrics)
      self._sums = _accumulate(self._sums, metrics)
      self._num_summed += 1
      # Bound the number of dispatched-but-unfinished steps. XLA's CPU
      # client aborts ("Termination timeout for all reduce") when dozens of
      # multi-device steps queue up; waiting on a step a few behind costs
      # nothing on any backend, since the device is busy with the next ones.
      self._in_flight.append(metrics["loss"])
      if len(self._in_flight) > _MAX_STEPS_IN_FLIGHT:
        self._in_flight.popleft().block_until_ready()

  def pop_metrics(self) -> dict[str, np.ndarray]:
    """Mean metrics over the steps since the last call (fetches once)."""
    sums = jax.device_get(self._sums)
    means = {k: np.asarray(v) / self._num_summed for k, v in sums.items()}
    self._sums, self._num_summed = None, 0
    return means

  def block_until_ready(self) -> None:
    jax.block_until_ready((self.state, self._sums))


# ----------------------------------------------------------------------------
# The run.


def _checkpoint_manager(workdir: pathlib.Path, max_to_keep: int):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def _restore(manager, step: int, target: TrainState) -> TrainState:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def _save(manager, state: TrainState) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager.save(int(state.step), args=ocp.args.StandardSave(state), force=True)


def _check_checkpoint_compatible(workdir: pathlib.Path,
                                 config: ml_collections.ConfigDict,
                                 model_config: models.ModelConfig,
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


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains a VAE with AEVB, evaluating, logging and checkpointing to `workdir`.

  A run started on a workdir that holds a checkpoint resumes from its last
  step and continues the same minibatch and noise streams.

  Args:
    config: an experiment config (see experiments/configs/mnist.py).
    workdir: where checkpoints, TensorBoard events, metrics.jsonl, images
      and summary.json go.

  Returns:
    The summary that is also written to `workdir/summary.json`.

  Raises:
    config_utils.ConfigError: a bad config value or an incompatible workdir.
    data.DataError: missing or malformed data.
    NonFiniteError: the loss or a gradient became NaN/inf (the last good
      checkpoint is kept).
  """
  from avb import data as data_lib  # pylint: disable=g-import-not-at-top
  from avb import writers  # pylint: disable=g-import-not-at-top

  wall_start = time.time()
  if jax.process_count() > 1:
    # Every process would feed the whole global batch as its local slice.
    raise config_utils.ConfigError(
        f"{jax.process_count()} processes: multi-host input slicing is not "
        "implemented yet; run a single process, which uses all its local devices")
  mesh = make_mesh()
  config_utils.validate_config(config, num_devices=mesh.size)
  workdir_path = config_utils.check_workdir(workdir)

  dataset = data_lib.load_dataset(
      config.data.name, source=config.data.source,
      data_dir=config.data.data_dir, tfds_data_dir=config.data.tfds_data_dir,
      seed=config.seed, train_size=config.data.train_size,
      test_size=config.data.test_size)
  logging.info("Data:\n%s", dataset.describe())
  train_images = dataset.train.images
  test_images = dataset.test.images
  num_train = train_images.shape[0]

  model_config = models.ModelConfig.from_config(config.model, dataset.image_shape)
  tx = make_optimizer(config.optimizer)
  replicated, sharded = shardings(mesh)
  init_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  state = jax.device_put(create_train_state(model_config, tx, init_rng), replicated)

  manager = _checkpoint_manager(workdir_path, config.training.max_checkpoints_to_keep)
  latest = manager.latest_step()
  if latest is not None:
    _check_checkpoint_compatible(workdir_path, config, model_config, state)
    try:
      state = _restore(manager, latest, state)
    except Exception as e:  # orbax raises many types for a mismatched tree.
      raise config_utils.ConfigError(
          f"--workdir={workdir} holds a checkpoint (step {latest}) that does "
          f"not fit this config ({type(e).__name__}); use a new --workdir or "
          "the config that wrote it") from None
    logging.info("Resumed from %s at step %d.", manager.directory, latest)
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
    })
  initial_step = int(state.step)

  train_step = jit_train_step(
      make_train_step(model_config, config, tx, num_train), mesh)
  elbo_sums, log_likelihood_sums = make_eval_fns(model_config, config, mesh)
  eval_key = jax.random.fold_in(jax.random.key(config.seed), 2)
  order = MinibatchOrder(num_train, config.training.batch_size, config.seed)
  logger = writers.MetricLogger(workdir_path)
  num_steps = config.training.num_steps
  batch_size = config.training.batch_size
  train_eval_images = train_images[:min(config.eval.train_examples, num_train)]

  def check_finite() -> None:
    bad_step = int(state.bad_step)
    if bad_step >= 0:
      last = manager.latest_step()
      raise NonFiniteError(
          f"non-finite loss or gradient at step {bad_step}; stopped. The last "
          f"good checkpoint (step {last}) in {manager.directory} is intact. "
          "Try a smaller --config.optimizer.learning_rate.")

  def run_eval(step: int) -> dict[str, np.ndarray]:
    test = elbo_summary(evaluate(elbo_sums, state.params, test_images,
                                 config.eval.batch_size, eval_key, sharded))
    logger.write(step, test, "test")
    return test

  def save_checkpoint() -> None:
    check_finite()
    _save(manager, state)

  loop = TrainLoop(train_step, state, train_images, order, sharded,
                   initial_step)
  boundaries = (config.training.log_every, config.training.eval_every,
                config.training.checkpoint_every)
  interval_start, interval_step = time.time(), initial_step
  try:
    while loop.step < num_steps:
      # Run to the next step at which something is logged, evaluated or saved.
      loop.run(min([num_steps] + [(loop.step // k + 1) * k for k in boundaries]))
      state, done = loop.state, loop.step
      if done % config.training.log_every == 0 or done == num_steps:
        check_finite()
        means = loop.pop_metrics()
        elapsed = time.time() - interval_start
        steps_per_sec = (done - interval_step) / max(elapsed, 1e-9)
        means.update(steps_per_sec=steps_per_sec,
                     examples_per_sec=steps_per_sec * batch_size,
                     examples_seen=done * batch_size,
                     epoch=done / order.steps_per_epoch,
                     eta_seconds=(num_steps - done) / max(steps_per_sec, 1e-9))
        logger.write(done, means, "train")
        interval_start, interval_step = time.time(), done
      if done % config.training.eval_every == 0 and done != num_steps:
        run_eval(done)
      if done % config.training.checkpoint_every == 0 and done != num_steps:
        save_checkpoint()
  except KeyboardInterrupt:
    # Keep the work done so far: a restart on the same workdir resumes here.
    state = loop.state
    try:
      if int(state.bad_step) < 0 and int(state.step) > initial_step:
        _save(manager, state)
        manager.wait_until_finished()
        logging.warning("Interrupted: saved a checkpoint at step %d.",
                        int(state.step))
    except RuntimeError as e:  # Interrupted mid-dispatch: buffers donated.
      logging.warning("Interrupted; no new checkpoint (%s). The last one "
                      "stands.", e)
    raise

  state = loop.state
  check_finite()
  if latest is None or int(state.step) != latest:
    _save(manager, state)
  manager.wait_until_finished()
  final_step = int(state.step)

  test = run_eval(final_step)
  train = elbo_summary(evaluate(elbo_sums, state.params, train_eval_images,
                                config.eval.batch_size, eval_key, sharded))
  logger.write(final_step, train, "train_eval")
  summary = {
      "dataset": config.data.name,
      "data_sources": {"train": dataset.train.source, "test": dataset.test.source},
      "num_train": num_train,
      "num_test": int(test_images.shape[0]),
      "num_latents": model_config.num_latents,
      "steps": final_step,
      "examples_seen": final_step * batch_size,
      "resumed_from_step": initial_step if latest is not None else None,
      "train_elbo": float(train["elbo"]),
      "train_elbo_examples": int(train_eval_images.shape[0]),
      "test_elbo": float(test["elbo"]),
      "test_reconstruction": float(test["reconstruction"]),
      "test_kl": float(test["kl"]),
  }

  if config.eval.log_likelihood_samples > 0:
    ll_images = test_images
    if config.eval.log_likelihood_examples is not None:
      ll_images = test_images[:config.eval.log_likelihood_examples]
    ll_start = time.time()
    ll = log_likelihood_summary(evaluate(
        log_likelihood_sums, state.params, ll_images, config.eval.batch_size,
        jax.random.fold_in(eval_key, 1), sharded))
    logger.write(final_step, ll, "test")
    summary.update(test_log_likelihood=ll["log_likelihood"],
                   test_log_likelihood_stderr=ll["log_likelihood_stderr"],
                   log_likelihood_samples=config.eval.log_likelihood_samples,
                   log_likelihood_examples=int(ll_images.shape[0]),
                   log_likelihood_seconds=time.time() - ll_start)

  _write_images(logger, final_step, model_config, state.params, test_images,
                config.eval.num_images, jax.random.fold_in(eval_key, 3))
  summary["wall_time_s"] = time.time() - wall_start
  writers.write_json(workdir_path / "summary.json", summary)
  logger.flush()
  logger.close()
  manager.close()
  logging.info("Summary: %s", json.dumps(summary))
  return summary


@functools.partial(jax.jit, donate_argnums=(0,))
def _accumulate(total: Metrics, metrics: Metrics) -> Metrics:
  return jax.tree.map(jnp.add, total, metrics)


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
