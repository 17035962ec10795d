"""beta-VAE and capacity-annealed beta-VAE on dSprites: train, score, picture.

`train_and_evaluate(config, workdir)` is the dSprites counterpart of
`train.train_and_evaluate` and reuses its machinery (train state, vmapped
sweeps, host prefetching, checkpoints, non-finite handling):

  1. loads dSprites offline (`dsprites.load_dsprites`: the official npz, a
     prepared TFDS copy, or the renderer's cache), or only a sub-grid of it
     (`config.data.factor_strides`, for smoke runs and tests);
  2. streams minibatches from the host (`input_pipeline.Prefetcher`; the full
     set is a 3 GB memory map, so it stays off the devices) and trains the
     objective `config.objective` names (`avb.objectives`): every run of a
     sweep (`config.sweep`: one axis, e.g. beta, times `sweep.seeds`) in one
     vmapped program;
  3. logs the per-latent KL (and C) every `training.log_every` steps to
     metrics.jsonl and TensorBoard, checkpoints, resumes exactly, and saves a
     checkpoint on Ctrl-C or SIGTERM;
  4. at the end scores every run's encoder means with the four metrics of
     `avb.disentanglement` (beta-VAE, FactorVAE, MIG, DCI; sizes in
     `config.eval`) and draws latent traversals (latents ordered by KL),
     reconstructions, prior samples and the KL-per-latent curves with C (the
     Burgess et al. figure); writes summary.json per run and one for the
     whole sweep with means and standard deviations over seeds.

Layout of `workdir` (a sweep puts each run's files under `sweep/<label>/`):
checkpoints/, config.json, run_info.json, metrics.jsonl, events.*,
images/{reconstructions,samples,traversal_<k>}_<step>.png,
images/traversal_<step>.gif (optional), images/kl_per_latent.png,
summary.json. Only process 0 writes.

Other datasets (the AEVB ones of `avb.data`) train too, for traversals and
KL curves, but have no ground-truth factors: asking for a metric on them is
a one-line ConfigError.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import resource
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from avb import random_streams
from avb import config_utils
from avb import data as data_lib
from avb import disentanglement
from avb import dsprites
from avb import input_pipeline
from avb import models
from avb import objectives
from avb import train

PyTree = Any

METRICS = ("beta_vae", "factor_vae", "mig", "dci")
DATASETS_WITH_FACTORS = ("dsprites",)
DATASETS = DATASETS_WITH_FACTORS + tuple(data_lib.DATASETS)
# fold_in indices under a run's seed, beside train's (0 noise, 1 init,
# 2 evaluation, 3 image grids, 4 data order).


# ----------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True)
class FactorData:
  """Training images and, where known, the factors that made them.

  Attributes:
    images: [N, H, W], uint8 0/1 (dSprites, may be a memmap) or float32 in
      [0, 1].
    source: provenance, e.g. "render:/abs/cache.npy".
    factor_sizes: classes per factor of the grid trained on (dSprites: 6
      factors, color's single class included), or None without factors.
    images_for: factor classes of that grid [n, F] -> images [n, H, W], or
      None without factors.
  """
  images: np.ndarray
  source: str
  factor_sizes: tuple[int, ...] | None = None
  images_for: Callable[[np.ndarray], np.ndarray] | None = None

  @property
  def image_shape(self) -> tuple[int, int]:
    return tuple(int(d) for d in self.images.shape[1:])


def factor_grid(strides: Sequence[int]) -> tuple[tuple[int, ...], ...]:
  """Every stride-th class of each dSprites factor: a sub-grid of the dataset."""
  return tuple(tuple(range(0, size, int(stride)))
               for size, stride in zip(dsprites.FACTOR_SIZES, strides))


def load_data(config: ml_collections.ConfigDict) -> FactorData:
  """Loads `config.data`: dSprites (the whole grid or a sub-grid) or an AEVB set.

  Raises:
    data.DataError: missing or malformed data (dSprites' errors included).
  """
  data_config = config.data
  if data_config.name not in DATASETS_WITH_FACTORS:
    dataset = data_lib.load_dataset(
        data_config.name, source=data_config.source,
        data_dir=data_config.data_dir,
        tfds_data_dir=data_config.tfds_data_dir, seed=config.seed)
    return FactorData(dataset.train.images, dataset.train.source)
  try:
    return _load_dsprites(data_config)
  except dsprites.DSpritesError as e:
    raise data_lib.DataError(str(e)) from None


def _load_dsprites(data_config: ml_collections.ConfigDict) -> FactorData:
  strides = tuple(data_config.factor_strides)
  grid = factor_grid(strides)
  sizes = tuple(len(g) for g in grid)
  whole = all(s == 1 for s in strides)
  source = data_config.source
  offline_render = source == "render" or (
      source == "auto" and dsprites.find_npz(data_config.data_dir) is None
      and not dsprites.tfds_is_prepared(data_config.tfds_data_dir))
  if whole or not offline_render:
    full = dsprites.load_dsprites(source, data_dir=data_config.data_dir,
                                  cache_dir=data_config.cache_dir,
                                  tfds_data_dir=data_config.tfds_data_dir)
    if whole:
      return FactorData(full.images, full.source, sizes, full.images_for)
    # A sub-grid of a complete copy: its rows, in the grid's order.
    images = full.images[dsprites.factors_to_index(dsprites.grid_classes(grid))]
    reference = full
    described = f"{full.source} (sub-grid, strides {strides})"
  else:
    # Render only the sub-grid: seconds, not the 3 GB of the whole set.
    subset = dsprites.render_to_cache(data_config.cache_dir, grid)
    images, reference, described = subset.images, None, subset.source
  lookup = [np.asarray(g, np.int64) for g in grid]

  def images_for(classes: np.ndarray) -> np.ndarray:
    # Sub-grid classes -> dSprites classes -> images (read, or rendered).
    classes = np.asarray(classes, np.int64)
    full_classes = np.stack([lookup[k][classes[:, k]]
                             for k in range(len(lookup))], axis=-1)
    return dsprites.images_for(full_classes, reference)

  return FactorData(images, described, sizes, images_for)


# ----------------------------------------------------------------------------
# Config checks.


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
  if not ok:
    raise config_utils.ConfigError(f"config.{field}={value!r} is invalid: {allowed}")


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _positive_ints(values: Any) -> bool:
  try:
    values = tuple(values)
  except TypeError:
    return False
  return len(values) >= 1 and all(_is_int(v) and v >= 1 for v in values)


def validate_config(config: ml_collections.ConfigDict, num_devices: int,
                    num_processes: int = 1) -> None:
  """Checks every field `train_and_evaluate` relies on, before any work.

  Args:
    config: a dSprites experiment config (experiments/configs/
      beta_vae_dsprites.py or capacity_dsprites.py).
    num_devices: the global device count; batches split evenly over it.
    num_processes: the number of processes.

  Raises:
    ConfigError: naming the first bad field, its value and the fix.
  """
  data_config = config.data
  _require(data_config.name in DATASETS, "data.name", data_config.name,
           f"allowed: {', '.join(DATASETS)}")
  has_factors = data_config.name in DATASETS_WITH_FACTORS
  metrics = tuple(config.eval.metrics)
  if metrics and not has_factors:
    raise config_utils.ConfigError(
        f"config.eval.metrics={metrics!r} needs ground-truth factors, which "
        f"data.name={data_config.name!r} does not have; use "
        f"--config.eval.metrics=() or data.name={DATASETS_WITH_FACTORS[0]!r}")
  sources = dsprites.SOURCES if has_factors else config_utils.DATA_SOURCES
  _require(data_config.source in sources, "data.source", data_config.source,
           f"allowed for {data_config.name}: {', '.join(sources)}")
  strides = tuple(data_config.factor_strides)
  _require(len(strides) == dsprites.NUM_FACTORS and _positive_ints(strides),
           "data.factor_strides", strides,
           "must be 6 ints >= 1, one per factor (color, shape, scale, "
           "orientation, posX, posY); all 1 is the whole dataset")
  _require(has_factors or all(s == 1 for s in strides), "data.factor_strides",
           strides, f"sub-grids exist for dSprites only, not {data_config.name}")

  model = config.model
  _require(_is_int(model.num_latents) and model.num_latents >= 1,
           "model.num_latents", model.num_latents, "must be >= 1")
  _require(model.architecture in models.ARCHITECTURES, "model.architecture",
           model.architecture, f"allowed: {', '.join(models.ARCHITECTURES)}")
  _require(_positive_ints(model.hidden_sizes), "model.hidden_sizes",
           tuple(model.hidden_sizes), "must be a non-empty tuple of widths >= 1")
  decoder_sizes = model.get("decoder_hidden_sizes")
  _require(decoder_sizes is None or _positive_ints(decoder_sizes),
           "model.decoder_hidden_sizes", decoder_sizes,
           "must be None (mirror hidden_sizes) or a tuple of widths >= 1")
  _require(_positive_ints(model.conv_channels), "model.conv_channels",
           tuple(model.conv_channels), "must be a non-empty tuple of channels >= 1")
  _require(model.activation in config_utils.ACTIVATIONS, "model.activation",
           model.activation, f"allowed: {', '.join(config_utils.ACTIVATIONS)}")
  decoder_activation = model.get("decoder_activation")
  _require(decoder_activation is None or
           decoder_activation in config_utils.ACTIVATIONS,
           "model.decoder_activation", decoder_activation,
           f"allowed: None, {', '.join(config_utils.ACTIVATIONS)}")
  _require(model.likelihood in config_utils.LIKELIHOODS, "model.likelihood",
           model.likelihood, f"allowed: {', '.join(config_utils.LIKELIHOODS)}")
  _require(model.init in config_utils.INITS, "model.init", model.init,
           f"allowed: {', '.join(config_utils.INITS)}")
  _require(model.init_std > 0, "model.init_std", model.init_std, "must be > 0")
  if has_factors and model.architecture == "conv":
    factor = 2 ** len(model.conv_channels)
    _require(dsprites.IMAGE_SIZE % factor == 0, "model.conv_channels",
             tuple(model.conv_channels),
             f"{len(model.conv_channels)} stride-2 layers do not divide 64x64 "
             "images; use at most 6")

  objectives.validate_objective(config.objective)

  optimizer = config.optimizer
  _one_of("optimizer.name", optimizer.name, config_utils.OPTIMIZERS)
  _require(optimizer.learning_rate > 0, "optimizer.learning_rate",
           optimizer.learning_rate, "must be > 0")

  training = config.training
  for field in ("batch_size", "num_steps", "log_every", "checkpoint_every"):
    _require(_is_int(training[field]) and training[field] >= 1,
             f"training.{field}", training[field], "must be an int >= 1")
  _require(training.batch_size % num_devices == 0, "training.batch_size",
           training.batch_size,
           f"must be divisible by the {num_devices} devices")
  _require(training.batch_size % num_processes == 0, "training.batch_size",
           training.batch_size,
           f"must be divisible by the {num_processes} processes")
  keep = training.get("max_checkpoints_to_keep")
  _require(keep is None or keep >= 1, "training.max_checkpoints_to_keep", keep,
           "must be >= 1, or None for all")

  _validate_eval(config.eval)
  config_utils.validate_sweep(config)
  seeds = tuple(config.sweep.get("seeds") or ())
  _require(all(_is_int(s) for s in seeds) and len(set(seeds)) == len(seeds),
           "sweep.seeds", seeds, "must be distinct ints, e.g. (0, 1, 2)")
  _require(not seeds or config.sweep.get("axis") != "seed", "sweep.seeds",
           seeds, "cannot be combined with sweep.axis='seed'; use one of them")
  for run in sweep_runs(config)[0]:
    objectives.check_weights(config.objective.name, run.hyper)


def _one_of(field: str, value: Any, allowed: Sequence[str]) -> None:
  _require(value in allowed, field, value, f"allowed: {', '.join(allowed)}")


def _validate_eval(evaluation: ml_collections.ConfigDict) -> None:
  metrics = tuple(evaluation.metrics)
  unknown = [m for m in metrics if m not in METRICS]
  _require(not unknown and len(set(metrics)) == len(metrics), "eval.metrics",
           metrics, f"must list distinct names from {', '.join(METRICS)}, or ()")
  counts = {
      "eval.encode_batch_size": evaluation.encode_batch_size,
      "eval.kl_examples": evaluation.kl_examples,
      "eval.num_images": evaluation.num_images,
      "eval.traversal_inputs": evaluation.traversal_inputs,
      "eval.beta_vae.batch_size": evaluation.beta_vae.batch_size,
      "eval.beta_vae.num_eval": evaluation.beta_vae.num_eval,
      "eval.factor_vae.batch_size": evaluation.factor_vae.batch_size,
      "eval.factor_vae.num_eval": evaluation.factor_vae.num_eval,
      "eval.mig.num_bins": evaluation.mig.num_bins,
      "eval.dci.num_test": evaluation.dci.num_test,
      "eval.dci.num_trees": evaluation.dci.num_trees,
  }
  for field, value in counts.items():
    _require(_is_int(value) and value >= 1, field, value, "must be an int >= 1")
  at_least_two = {
      "eval.beta_vae.num_train": evaluation.beta_vae.num_train,
      "eval.factor_vae.num_train": evaluation.factor_vae.num_train,
      "eval.factor_vae.num_variance_estimate":
          evaluation.factor_vae.num_variance_estimate,
      "eval.mig.num_points": evaluation.mig.num_points,
      "eval.dci.num_train": evaluation.dci.num_train,
  }
  for field, value in at_least_two.items():
    _require(_is_int(value) and value >= 2, field, value, "must be an int >= 2")
  _one_of("eval.dci.importance_model", evaluation.dci.importance_model,
          disentanglement.IMPORTANCE_MODELS)
  traversal_range = tuple(evaluation.traversal_range)
  _require(len(traversal_range) == 2 and all(
      isinstance(v, (int, float)) and math.isfinite(v) for v in traversal_range)
           and traversal_range[0] < traversal_range[1],
           "eval.traversal_range", traversal_range,
           "the range is empty; give (low, high) with low < high, e.g. "
           "(-2.5, 2.5)")
  _require(evaluation.switch_on_kl > 0, "eval.switch_on_kl",
           evaluation.switch_on_kl, "must be > 0 nats")
  _require(_is_int(evaluation.traversal_steps) and evaluation.traversal_steps >= 2,
           "eval.traversal_steps", evaluation.traversal_steps,
           "must be an int >= 2 (values from low to high)")


# ----------------------------------------------------------------------------
# Sweeps: one axis (train.sweep_runs) times seeds.


def sweep_runs(config: ml_collections.ConfigDict) -> tuple[list[train.Run], bool]:
  """The runs of `config.sweep`: each value of its axis for each of `sweep.seeds`.

  `sweep.axis`/`sweep.grid` are as in `train.sweep_runs` ("seed",
  "optimizer.learning_rate" or "objective.<float field>"); a non-empty
  `sweep.seeds` repeats every run once per seed (labels "beta=4,seed=1"), so
  beta values and seeds train together in one vmapped program.
  """
  runs, swept = train.sweep_runs(config)
  seeds = tuple(config.sweep.get("seeds") or ())
  if not seeds:
    return runs, swept
  expanded = []
  for run in runs:
    for seed in seeds:
      label = f"seed={seed}" if not swept else f"{run.label},seed={seed}"
      expanded.append(dataclasses.replace(run, label=label, seed=int(seed)))
  return expanded, True


# ----------------------------------------------------------------------------
# Evaluation pieces, usable from a notebook.


def make_encoder_mean(model_config: models.ModelConfig) -> Callable:
  """jitted (params, images [b, H, W] float) -> encoder means [b, J]."""
  model = models.VAE(model_config)

  @jax.jit
  def encoder_mean(params, images):
    x = images.reshape(images.shape[0], -1)
    mean, _ = model.apply({"params": params}, x, method=models.VAE.encode)
    return mean

  return encoder_mean


def make_decoder_mean(model_config: models.ModelConfig) -> Callable:
  """jitted (params, z [..., J]) -> expected pixels [..., H, W]."""
  model = models.VAE(model_config)

  @jax.jit
  def decoder_mean(params, z):
    decoded = model.apply({"params": params}, z, method=models.VAE.decode)
    pixels = models.decoder_mean(model_config.likelihood, decoded)
    return pixels.reshape(*z.shape[:-1], *model_config.data_shape)

  return decoder_mean


def posterior_statistics(model_config: models.ModelConfig, params: PyTree,
                         images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
  """Mean KL per latent [J] and encoder means [n, J] of `images` [n, H, W]."""
  model = models.VAE(model_config)

  @jax.jit
  def batch_terms(params, x):
    mean, log_var = model.apply({"params": params}, x, method=models.VAE.encode)
    return mean, 0.5 * (jnp.exp(log_var) + jnp.square(mean) - 1.0 - log_var)

  means, kls = [], []
  for start in range(0, images.shape[0], batch_size):
    chunk = np.asarray(images[start:start + batch_size], np.float32)
    mean, kl = batch_terms(params, chunk.reshape(chunk.shape[0], -1))
    means.append(np.asarray(mean))
    kls.append(np.asarray(kl))
  kl = np.concatenate(kls)
  return {"kl_per_latent": kl.mean(axis=0), "means": np.concatenate(means)}


def traversals(decoder_mean: Callable, params: PyTree, codes: np.ndarray,
               latent_order: Sequence[int], values: np.ndarray) -> np.ndarray:
  """Decoded latent traversals.

  Args:
    decoder_mean: from `make_decoder_mean`.
    params: the model's parameters.
    codes: [n, J] starting points (encoder means of n inputs).
    latent_order: the latents to vary, in the order of the output rows.
    values: [S] values each latent takes in turn, the others fixed.

  Returns:
    [n, len(latent_order), S, H, W] expected pixels.
  """
  codes = np.asarray(codes, np.float32)
  order = np.asarray(latent_order, np.int64)
  z = np.broadcast_to(codes[:, None, None, :],
                      (codes.shape[0], order.size, values.size,
                       codes.shape[1])).copy()
  for row, latent in enumerate(order):
    z[:, row, :, latent] = values[None, :]
  return np.asarray(decoder_mean(params, jnp.asarray(z)))


def compute_metrics(evaluation: ml_collections.ConfigDict,
                    represent: disentanglement.Represent,
                    factor_sizes: Sequence[int]) -> dict[str, dict]:
  """The metrics `evaluation.metrics` names, each with its own fixed seed.

  Every run of a sweep gets the same factor samples (the seeds depend on
  `evaluation.metrics_seed` and the metric only), so scores differ only by
  the representation.

  Returns:
    name -> the metric's result with arrays as lists (JSON-ready), plus
    "seconds".
  """
  results = {}
  for name in evaluation.metrics:
    rng = np.random.default_rng([evaluation.metrics_seed, METRICS.index(name)])
    start = time.time()
    try:
      if name == "beta_vae":
        section = evaluation.beta_vae
        result = disentanglement.beta_vae_score(
            represent, factor_sizes, rng, batch_size=section.batch_size,
            num_train=section.num_train, num_eval=section.num_eval)
      elif name == "factor_vae":
        section = evaluation.factor_vae
        result = disentanglement.factor_vae_score(
            represent, factor_sizes, rng, batch_size=section.batch_size,
            num_train=section.num_train, num_eval=section.num_eval,
            num_variance_estimate=section.num_variance_estimate)
      elif name == "mig":
        section = evaluation.mig
        result = disentanglement.mig_score(
            represent, factor_sizes, rng, num_points=section.num_points,
            num_bins=section.num_bins)
      else:
        section = evaluation.dci
        result = disentanglement.dci_score(
            represent, factor_sizes, rng, num_train=section.num_train,
            num_test=section.num_test,
            importance_model=section.importance_model,
            num_trees=section.num_trees)
    except disentanglement.MetricError as e:
      raise config_utils.ConfigError(
          f"the {name} metric cannot run with config.eval.{name}: {e}") from None
    result = {k: _jsonable(v) for k, v in result.items()}
    result["seconds"] = time.time() - start
    results[name] = result
  return results


def _jsonable(value: Any) -> Any:
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


def read_train_records(path: pathlib.Path) -> list[dict]:
  """The "train" records of a metrics.jsonl, one per step (the last wins).

  A run killed between a log and the next checkpoint logs some steps twice
  once resumed; keeping the last record of each step drops the stale one.
  """
  if not path.exists():
    return []
  by_step = {}
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    record = json.loads(line)
    if record.get("split") == "train" and "kl_per_latent" in record:
      by_step[record["step"]] = record
  return [by_step[s] for s in sorted(by_step)]


def switch_on_order(records: Sequence[dict], threshold: float) -> list[dict]:
  """When each latent "switched on": its KL first reached `threshold` nats.

  Burgess et al.'s claim is that, as C grows, latents switch on one after
  another; this lists them in the order they did, with the step and (for
  the capacity objective) the C of that log record.

  Args:
    records: `read_train_records` output.
    threshold: KL in nats above which a latent counts as on.

  Returns:
    [{"latent", "step", "capacity" (if logged), "kl_final"}], by step; latents
    that never reached the threshold are left out.
  """
  if not records:
    return []
  kl = np.array([r["kl_per_latent"] for r in records])   # [T, J]
  order = []
  for latent in range(kl.shape[1]):
    above = np.flatnonzero(kl[:, latent] >= threshold)
    if above.size:
      record = records[int(above[0])]
      entry = {"latent": latent, "step": record["step"],
               "kl_final": float(kl[-1, latent])}
      if "capacity" in record:
        entry["capacity"] = record["capacity"]
      order.append(entry)
  return sorted(order, key=lambda e: (e["step"], e["latent"]))


def plot_kl_per_latent(records: Sequence[dict], path: pathlib.Path,
                       title: str = "", switch_on_kl: float | None = None
                       ) -> pathlib.Path | None:
  """KL of each latent over training, with C where logged (Burgess et al., fig. 3).

  Args:
    records: `read_train_records` output.
    path: the PNG to write.
    title: the figure's title, e.g. the run label.

  Returns:
    `path`, or None when there is nothing to plot.
  """
  if not records:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  steps = np.array([r["step"] for r in records])
  kl = np.array([r["kl_per_latent"] for r in records])   # [T, J]
  switched = {}
  if switch_on_kl is not None and "capacity" in records[0]:
    switched = {e["latent"]: e["capacity"]
                for e in switch_on_order(records, switch_on_kl)}
  figure, axes = plt.subplots(figsize=(7, 4.2))
  order = np.argsort(-kl[-1])
  colours = plt.get_cmap("tab10" if kl.shape[1] <= 10 else "tab20")
  for rank, latent in enumerate(order):
    label = f"z{latent} ({kl[-1, latent]:.2f}"
    if latent in switched:
      label += f", on at C={switched[latent]:.1f}"
    axes.plot(steps, kl[:, latent], color=colours(rank % colours.N),
              label=label + ")", linewidth=1.4)
  if "capacity" in records[0]:
    axes.plot(steps, [r["capacity"] for r in records], "k--", linewidth=1.2,
              label="C (total)")
    axes.plot(steps, kl.sum(axis=1), color="grey", linewidth=1.0, alpha=0.7,
              label="KL (total)")
  axes.set_xlabel("training step")
  axes.set_ylabel("KL (nats)")
  axes.set_title(title or "KL per latent")
  axes.grid(alpha=0.3)
  axes.legend(fontsize=7, ncol=2, loc="upper left")
  figure.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=110)
  plt.close(figure)
  return path


def save_gif(path: pathlib.Path, frames: Sequence[np.ndarray],
             duration_ms: int = 150) -> pathlib.Path:
  """Writes greyscale frames [H, W] in [0, 1] as a looping animated GIF."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  images = [Image.fromarray(np.uint8(np.clip(f, 0, 1) * 255)) for f in frames]
  path.parent.mkdir(parents=True, exist_ok=True)
  images[0].save(path, save_all=True, append_images=images[1:],
                 duration=duration_ms, loop=0)
  return path


# ----------------------------------------------------------------------------
# The run.


def _cpu_seconds() -> float:
  """CPU time (user + system) of this process so far: on a shared machine a
  fairer measure of cost than wall time."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _run_slice(tree: PyTree, index: int | None) -> PyTree:
  return tree if index is None else jax.tree.map(lambda x: x[index], tree)


def _param_shapes(params: PyTree) -> dict[str, list[int]]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(path): list(leaf.shape) for path, leaf in flat}


def _run_info(config: ml_collections.ConfigDict,
              model_config: models.ModelConfig, runs: list[train.Run],
              params: PyTree) -> dict:
  return {
      "model": dataclasses.asdict(model_config),
      "objective": config.objective.name,
      "capacity_steps": config.objective.get("capacity_steps"),
      "optimizer": config.optimizer.name,
      "param_shapes": _param_shapes(params),
      "runs": [dataclasses.asdict(r) for r in runs],
  }


def _check_resumable(workdir: pathlib.Path, expected: dict) -> None:
  """Refuses a checkpoint written for another model, objective or sweep."""
  path = workdir / "run_info.json"
  if not path.exists():
    return
  saved = json.loads(path.read_text())
  for key in ("param_shapes", "objective", "capacity_steps", "optimizer", "runs"):
    if saved.get(key) != json.loads(json.dumps(expected[key])):
      detail = {
          "param_shapes": "a different model",
          "objective": f"objective {saved.get('objective')!r}",
          "capacity_steps": f"capacity_steps={saved.get('capacity_steps')}",
          "optimizer": f"optimizer {saved.get('optimizer')!r}",
          "runs": "a different sweep (runs, seeds or weights)",
      }[key]
      raise config_utils.ConfigError(
          f"--workdir={workdir} holds a checkpoint written with {detail}; use "
          "a new --workdir or the config that wrote it")


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains a beta-VAE or capacity VAE, scores and pictures it; see the module doc.

  A run started on a workdir that holds a checkpoint resumes from its last
  step: the same minibatches, noise and C schedule as an uninterrupted run.

  Args:
    config: experiments/configs/beta_vae_dsprites.py or capacity_dsprites.py.
    workdir: where everything is written (by process 0).

  Returns:
    The summary also written to `workdir/summary.json`: one run's, or for a
    sweep {"runs": [...], "by_value": means and stds over seeds, ...}.

  Raises:
    config_utils.ConfigError: a bad config value or an incompatible workdir.
    data.DataError: missing or malformed data.
    train.NonFiniteError: the loss or a gradient became NaN/inf (single
      run; in a sweep the run is frozen at its last good state and reported).
  """
  from avb import writers  # pylint: disable=g-import-not-at-top

  wall_start = time.time()
  mesh = train.make_mesh()
  validate_config(config, num_devices=mesh.size,
                  num_processes=jax.process_count())
  workdir_path = config_utils.check_workdir(workdir)
  runs, swept = sweep_runs(config)
  num_runs = len(runs) if swept else None

  factor_data = load_data(config)
  logging.info("Data: %d images %s from %s", factor_data.images.shape[0],
               factor_data.image_shape, factor_data.source)
  batch_size = config.training.batch_size
  num_shards = mesh.size
  num_images = factor_data.images.shape[0]
  per_shard = input_pipeline.shard_size(num_images, num_shards, batch_size)
  train_images = factor_data.images[input_pipeline.process_rows(num_images,
                                                                num_shards)]
  try:
    model_config = models.ModelConfig.from_config(config.model,
                                                  factor_data.image_shape)
  except ValueError as e:
    raise config_utils.ConfigError(f"config.model does not fit the data: {e}") from None
  tx = train.make_optimizer(config.optimizer)
  replicated, sharded = train.shardings(mesh)
  state = jax.device_put(train.create_states(runs, swept, model_config, tx),
                         replicated)
  run_info = _run_info(config, model_config, runs, state.params)

  manager = train.checkpoint_manager(workdir_path,
                                     config.training.max_checkpoints_to_keep)
  latest = manager.latest_step()
  if latest is not None:
    _check_resumable(workdir_path, run_info)
    state = train.resume(manager, latest, state, workdir)
    summary_path = workdir_path / "summary.json"
    if latest >= config.training.num_steps and summary_path.exists():
      logging.info("Run already complete; its summary is %s.", summary_path)
      manager.close()
      return json.loads(summary_path.read_text())
  else:
    writers.write_json(workdir_path / "config.json", config.to_dict())
    writers.write_json(workdir_path / "run_info.json", run_info)
  initial_step = latest if latest is not None else 0

  loss = objectives.make_loss(config.objective, model_config)
  train_step = objectives.make_train_step(loss, tx)
  order = input_pipeline.HostOrder(runs[0].seed, num_shards, per_shard,
                                   batch_size)
  prefetcher = input_pipeline.Prefetcher(
      train_images, order, sharded, initial_step,
      transform=lambda rows: np.asarray(rows, np.float32))
  loop = train.TrainLoop(state, initial_step,
                         train_step=train.jit_train_step(train_step, mesh,
                                                         num_runs),
                         prefetcher=prefetcher)
  steps_per_epoch = per_shard // (batch_size // num_shards)

  run_dirs = ([workdir_path / "sweep" / r.label for r in runs] if swept
              else [workdir_path])
  loggers = []
  for run, run_dir in zip(runs, run_dirs):
    if jax.process_index() == 0:
      run_dir.mkdir(parents=True, exist_ok=True)
    loggers.append(writers.MetricLogger(
        run_dir, num_steps=config.training.num_steps,
        label=run.label if swept else None))
  indices = list(range(len(runs))) if swept else [None]
  num_steps = config.training.num_steps
  reported_bad: set[int] = set()
  capacity_steps = config.objective.get("capacity_steps")

  def check_finite() -> None:
    bad = np.asarray(loop.state.bad_step).reshape(-1)
    if not swept and bad[0] >= 0:
      raise train.NonFiniteError(
          f"non-finite loss or gradient at step {bad[0]}; stopped. The last "
          f"good checkpoint (step {manager.latest_step()}) in "
          f"{manager.directory} is intact. Try a smaller "
          "--config.optimizer.learning_rate.")
    for i in np.flatnonzero(bad >= 0):
      if i not in reported_bad:
        reported_bad.add(int(i))
        logging.warning("Run %s: non-finite loss or gradient at step %d; it "
                        "keeps its last good parameters.", runs[i].label, bad[i])

  boundaries = (config.training.log_every, config.training.checkpoint_every)
  interval_start, interval_step = time.time(), initial_step
  try:
    while loop.step < num_steps:
      loop.run(min([num_steps] + [(loop.step // k + 1) * k for k in boundaries]))
      done = loop.step
      if done % config.training.log_every == 0 or done == num_steps:
        check_finite()
        means = loop.pop_metrics()
        elapsed = time.time() - interval_start
        steps_per_sec = (done - interval_step) / max(elapsed, 1e-9)
        timing = dict(steps_per_sec=steps_per_sec,
                      examples_per_sec=steps_per_sec * batch_size * len(runs),
                      epoch=done / steps_per_epoch,
                      eta_seconds=(num_steps - done) / max(steps_per_sec, 1e-9),
                      input_wait_fraction=prefetcher.wait_seconds / max(elapsed, 1e-9))
        prefetcher.wait_seconds = 0.0
        for logger, index, run in zip(loggers, indices, runs):
          record = _run_slice(means, index)
          if capacity_steps is not None:
            # C at this very step, not its mean over the interval: the
            # logged schedule then does not depend on where a run resumed.
            record["capacity"] = float(objectives.capacity_schedule(
                done, run.hyper["capacity_max"], capacity_steps))
          logger.write(done, {**record, **timing}, "train")
        interval_start, interval_step = time.time(), done
      if done % config.training.checkpoint_every == 0 and done != num_steps:
        check_finite()
        train.save_checkpoint(manager, loop.state)
  except KeyboardInterrupt:
    # Keep the work done so far: a restart on the same workdir resumes here.
    try:
      if loop.step > initial_step and (swept or int(loop.state.bad_step) < 0):
        train.save_checkpoint(manager, loop.state)
        manager.wait_until_finished()
        logging.warning("Interrupted: saved a checkpoint at step %d.", loop.step)
    except RuntimeError as e:  # Interrupted mid-dispatch: buffers donated.
      logging.warning("Interrupted; no new checkpoint (%s). The last one "
                      "stands.", e)
    raise
  finally:
    prefetcher.close()

  state = loop.state
  check_finite()
  final_step = loop.step
  if latest is None or final_step != latest:
    train.save_checkpoint(manager, state)
  manager.wait_until_finished()
  train_seconds = time.time() - wall_start
  train_cpu_seconds = _cpu_seconds()

  bad_steps = np.asarray(state.bad_step).reshape(-1)
  host_params = jax.device_get(state.params)
  summaries = []
  for r, (run, logger, index, run_dir) in enumerate(
      zip(runs, loggers, indices, run_dirs)):
    summary = {
        "label": run.label,
        "dataset": config.data.name,
        "data_source": factor_data.source,
        "num_train": int(num_images),
        "architecture": model_config.architecture,
        "num_latents": model_config.num_latents,
        "objective": config.objective.name,
        "seed": run.seed,
        "learning_rate": run.learning_rate,
        "hyper": run.hyper,
        "steps": final_step,
        "examples_seen": final_step * batch_size,
        "resumed_from_step": initial_step if latest is not None else None,
        "non_finite_step": int(bad_steps[r]) if bad_steps[r] >= 0 else None,
    }
    if config.objective.name == "beta_vae":
      summary["normalised_beta"] = (run.hyper["beta"] * model_config.num_latents
                                    / model_config.data_dim)
    else:
      summary["capacity_final"] = float(objectives.capacity_schedule(
          final_step, run.hyper["capacity_max"], capacity_steps))
    if jax.process_index() == 0:
      summary.update(_evaluate_run(
          config, model_config, _run_slice(host_params, index), factor_data,
          logger, run_dir, run, final_step))
    summary["wall_time_s"] = time.time() - wall_start
    summaries.append(summary)
    logger.flush()
    logger.close()

  if swept:
    for run_dir, summary in zip(run_dirs, summaries):
      writers.write_json(run_dir / "summary.json", summary)
    result = {"sweep": {"axis": config.sweep.axis, "grid": list(config.sweep.grid),
                        "seeds": list(config.sweep.get("seeds") or ())},
              "runs": summaries, "by_value": _aggregate(config, runs, summaries),
              "train_seconds": train_seconds,
              "train_cpu_seconds": train_cpu_seconds,
              "cpu_seconds": _cpu_seconds(),
              "wall_time_s": time.time() - wall_start}
  else:
    result = summaries[0]
    result.update(train_seconds=train_seconds,
                  train_cpu_seconds=train_cpu_seconds,
                  cpu_seconds=_cpu_seconds())
  writers.write_json(workdir_path / "summary.json", result)
  manager.close()
  logging.info("Summary: %s", workdir_path / "summary.json")
  return result


def _evaluate_run(config: ml_collections.ConfigDict,
                  model_config: models.ModelConfig, params: PyTree,
                  factor_data: FactorData, logger, run_dir: pathlib.Path,
                  run: train.Run, step: int) -> dict[str, Any]:
  """Posterior KL, metrics and pictures of one trained run."""
  evaluation = config.eval
  rng = np.random.default_rng([evaluation.metrics_seed, 101])
  num_images = factor_data.images.shape[0]
  rows = rng.choice(num_images, min(evaluation.kl_examples, num_images),
                    replace=False)
  # Read in index order (fast on a memory map), keep the random order: the
  # pictures below show the first few, which must not all share a shape.
  order = np.argsort(rows)
  sample = np.empty((rows.size, *factor_data.image_shape), np.float32)
  sample[order] = factor_data.images[rows[order]]
  statistics = posterior_statistics(model_config, params, sample,
                                    evaluation.encode_batch_size)
  kl = statistics["kl_per_latent"]
  latent_order = np.argsort(-kl, kind="stable")
  result: dict[str, Any] = {
      "kl_per_latent": kl.tolist(),
      "kl_total": float(kl.sum()),
      "latents_by_kl": latent_order.tolist(),
      "active_latents": int(np.sum(kl > evaluation.active_kl_threshold)),
      "active_kl_threshold": evaluation.active_kl_threshold,
      "kl_examples": int(sample.shape[0]),
  }

  if evaluation.metrics:
    encoder_mean = make_encoder_mean(model_config)
    represent = disentanglement.image_representation(
        lambda images: np.asarray(encoder_mean(params, images)),
        factor_data.images_for, batch_size=evaluation.encode_batch_size)
    start = time.time()
    metrics = compute_metrics(evaluation, represent, factor_data.factor_sizes)
    result["metrics"] = metrics
    result["scores"] = {name: m["score"] for name, m in metrics.items()}
    result["metrics_seconds"] = time.time() - start
    logger.write(step, result["scores"], "eval")

  # Pictures: reconstructions, prior samples, traversals, KL curves.
  decoder_mean = make_decoder_mean(model_config)
  picture_key = random_streams.key(run.seed, random_streams.Stream.PICTURES)
  count = min(evaluation.num_images, sample.shape[0])
  columns = int(math.ceil(math.sqrt(count)))
  originals = sample[:count]
  reconstructions = np.asarray(decoder_mean(params, jnp.asarray(
      statistics["means"][:count])))
  grid_rows = []
  for start in range(0, count, columns):
    for row in (originals[start:start + columns],
                reconstructions[start:start + columns]):
      pad = np.ones((columns - len(row), *row.shape[1:]), np.float32)
      grid_rows.append(np.concatenate([row, pad]))
  paths = {"reconstructions": logger.write_images(
      step, "reconstructions", np.concatenate(grid_rows), columns)}
  z = jax.random.normal(picture_key, (count, model_config.num_latents))
  paths["samples"] = logger.write_images(
      step, "samples", np.asarray(decoder_mean(params, z)), columns)

  values = np.linspace(*evaluation.traversal_range,
                       evaluation.traversal_steps).astype(np.float32)
  inputs = statistics["means"][:evaluation.traversal_inputs]
  decoded = traversals(decoder_mean, params, inputs, latent_order, values)
  for k in range(decoded.shape[0]):
    flat = decoded[k].reshape(-1, *decoded.shape[-2:])   # rows: latents by KL
    paths[f"traversal_{k}"] = logger.write_images(
        step, f"traversal_{k}", flat, values.size)
  if evaluation.traversal_gif and jax.process_index() == 0:
    from avb import plotting  # pylint: disable=g-import-not-at-top
    # Frame t: every input (rows) with each latent (columns) at values[t].
    frames = [plotting.image_grid(
        decoded[:, :, t].reshape(-1, *decoded.shape[-2:]), decoded.shape[1])
              for t in range(values.size)]
    frames = frames + frames[-2:0:-1]  # there and back
    paths["traversal_gif"] = save_gif(
        run_dir / "images" / f"traversal_{step:08d}.gif", frames)
  logger.flush()
  records = read_train_records(run_dir / "metrics.jsonl")
  result["switch_on"] = switch_on_order(records, evaluation.switch_on_kl)
  if jax.process_index() == 0:
    paths["kl_per_latent"] = plot_kl_per_latent(
        records, run_dir / "images" / "kl_per_latent.png", run.label,
        evaluation.switch_on_kl)
  result["traversal_values"] = values.tolist()
  result["images"] = {k: str(v) for k, v in paths.items() if v is not None}
  return result


def _aggregate(config: ml_collections.ConfigDict, runs: list[train.Run],
               summaries: list[dict]) -> list[dict]:
  """Mean and std over seeds of each score, per value of the sweep axis."""
  axis = config.sweep.get("axis")
  groups: dict[Any, list[dict]] = {}
  for run, summary in zip(runs, summaries):
    if axis is None or axis == "seed":
      key = None
    elif axis == "optimizer.learning_rate":
      key = run.learning_rate
    else:
      key = run.hyper[axis.split(".", 1)[1]]
    groups.setdefault(key, []).append(summary)
  table = []
  for key, members in groups.items():
    row = {"axis": axis, "value": key, "num_runs": len(members),
           "seeds": [m["seed"] for m in members]}
    names = sorted({n for m in members for n in m.get("scores", {})})
    for name in names:
      scores = np.array([m["scores"][name] for m in members])
      row[name] = {"mean": float(scores.mean()),
                   "std": float(scores.std(ddof=1)) if scores.size > 1 else 0.0,
                   "values": scores.tolist()}
    active = np.array([m["active_latents"] for m in members if "active_latents" in m])
    if active.size:
      row["active_latents"] = {"mean": float(active.mean()),
                               "values": active.tolist()}
    table.append(row)
  return table
