"""How noisy is the ELBO gradient? Score-function vs reparameterized estimators.

AEVB (Kingma & Welling 2013, section 2.3) motivates the reparameterization
trick by the variance of the usual score-function (likelihood-ratio,
REINFORCE) estimator of grad_phi E_q[f(z)]. This module measures both on a
trained (or training) VAE.

What is compared. The objective is the per-example ELBO

  ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || N(0, I)),

with the KL in closed form (estimator B) in every estimator, so they differ
only in how the gradient of the expectation term reaches the encoder's
(variational) parameters phi:

  * "reparameterized": the pathwise gradient, 1/L sum_l grad_phi
    log p(x | mean + sigma * eps_l), what AEVB trains with;
  * "score_function": 1/L sum_l log p(x|z_l) grad_phi log q(z_l|x), no
    baseline (`estimators.score_function_surrogate`);
  * "score_function_mean_baseline": the same with a constant baseline b
    subtracted from log p(x|z_l): the minibatch mean of the reconstruction
    term, estimated from independent draws at the current parameters; it is
    what a moving average of the training loss's reconstruction term tracks;
  * "score_function_leave_one_out": b_l = the mean of log p(x|z_k) over the
    example's other L - 1 samples (needs L >= 2; skipped for L = 1).

All four are unbiased for the same gradient and use the same number L of
samples of z per example. Only the encoder's gradient is compared: the
decoder's (theta) gradient is the pathwise grad_theta log p(x|z_l) at fixed
z_l in every one of them, so it is identical by construction.

What is measured, at given parameters, on a fixed minibatch x_1..x_B: for
each example, N independent estimates g_{i,1..N} of grad_phi ELBO(x_i),
each from its own L draws, as per-draw gradients
`jax.vmap(jax.grad(objective))` over N keys (the encoder's forward pass is
shared by the draws, since x_i is the same). Then, per parameter group (a
layer's kernel and bias) and in total:

  variance = 1/B sum_i trace Cov_n(g_{i,n}): the total variance of the
    one-example, L-sample estimate (the Monte Carlo noise only, averaged over
    the minibatch; the minibatch-sampling noise is the same for every
    estimator and is left out);
  minibatch_variance = variance / B: that of the minibatch-mean gradient the
    optimizer sees (the examples' draws are independent);
  snr = ||g|| / sqrt(minibatch_variance): the signal-to-noise ratio of that
    minibatch gradient. g, the expected gradient, is the same for every
    (unbiased) estimator, so ||g||^2 comes from the most precise of them,
    the reparameterized one at the same L (or the estimator itself when that
    one is not measured), estimated without bias from its mean gbar over the
    B * N estimates as ||gbar||^2 - minibatch_variance / N (floored at 0):
    a noisy estimator is neither credited with the norm of its own noise nor
    given an SNR of 0 because its mean is lost in it;
  unbiasedness = ||gbar_e - gbar_reparam||^2 / ((var_e + var_reparam) /
    (B N)): close to 1 when estimator e is unbiased (the squared difference
    of two unbiased means is pure noise of that expected size), much larger
    when it is not.

`run_study(config, workdir)` trains the VAE with AEVB as usual (estimator B,
reparameterized) and takes these measurements at log-spaced steps; it writes
gradient_variance.csv, gradient_variance.png and summary.json.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from avb import random_streams
from avb import config_utils
from avb import distributions
from avb import estimators
from avb import input_pipeline
from avb import models
from avb import train

PyTree = Any

REPARAMETERIZED = "reparameterized"
SCORE_FUNCTION = "score_function"
MEAN_BASELINE = "score_function_mean_baseline"
LEAVE_ONE_OUT = "score_function_leave_one_out"
ESTIMATORS = (REPARAMETERIZED, SCORE_FUNCTION, MEAN_BASELINE, LEAVE_ONE_OUT)
TOTAL = "total"  # the group name of the whole encoder

CSV_FIELDS = ("step", "estimator", "num_samples", "group", "variance",
              "minibatch_variance", "mean_norm", "snr", "ratio_to_reparameterized",
              "unbiasedness", "num_draws", "batch_size", "test_elbo")


def needs_two_samples(estimator: str) -> bool:
  return estimator == LEAVE_ONE_OUT


def _check_estimator(estimator: str) -> None:
  if estimator not in ESTIMATORS:
    raise ValueError(f"Unknown gradient estimator {estimator!r}; expected one "
                     f"of {ESTIMATORS}.")


# ----------------------------------------------------------------------------
# The per-example objective and its per-draw gradients.


def example_objective(model_config: models.ModelConfig, estimator: str,
                      num_samples: int) -> Callable[..., jax.Array]:
  """The one-example ELBO estimate whose encoder gradient is `estimator`'s.

  Args:
    model_config: the VAE (a Gaussian q(z|x), as `train.encode` builds).
    estimator: one of `ESTIMATORS`.
    num_samples: L, the draws of z per estimate.

  Returns:
    `objective(encoder_params, decoder_params, x [D], rng, baseline) ->
    scalar`: the ELBO estimate of x (its value is the same Monte Carlo
    estimate for every estimator; only its gradient with respect to
    `encoder_params` differs). `baseline` is a scalar, used by
    "score_function_mean_baseline" only.
  """
  _check_estimator(estimator)
  if needs_two_samples(estimator) and num_samples < 2:
    raise ValueError(f"{estimator} needs num_samples >= 2, got {num_samples}.")

  def objective(encoder_params, decoder_params, x, rng, baseline):
    params = {"encoder": encoder_params, "decoder": decoder_params}
    mean, log_var, log_likelihood_fn = train.encode(model_config, params,
                                                    x[None])  # [1, J]
    kl = jnp.sum(distributions.kl_to_standard_normal(mean, log_var), -1)  # [1]
    if estimator == REPARAMETERIZED:
      reconstruction = estimators.sgvb_b(
          rng, mean, log_var, log_likelihood_fn, num_samples)["reconstruction"]
    else:
      chosen = {SCORE_FUNCTION: None, MEAN_BASELINE: baseline,
                LEAVE_ONE_OUT: "leave_one_out"}[estimator]
      reconstruction = estimators.score_function_surrogate(
          rng, mean, log_var, log_likelihood_fn, num_samples, baseline=chosen)
    return (reconstruction - kl)[0]

  return objective


def per_draw_gradients(objective: Callable[..., jax.Array], params: PyTree,
                       x: jax.Array, keys: jax.Array,
                       baseline: jax.Array) -> PyTree:
  """N independent encoder-gradient estimates for one example.

  Args:
    objective: from `example_objective`.
    params: the VAE's {"encoder", "decoder"} parameters.
    x: one example, [D].
    keys: N PRNG keys, one per estimate.
    baseline: scalar (see `example_objective`).

  Returns:
    The encoder's parameter tree with a leading [N] axis on every leaf,
    computed as `jax.vmap(jax.grad(...))` over the keys
    (`estimators.per_example_grads`).
  """
  return estimators.per_example_grads(
      lambda encoder, key: objective(encoder, params["decoder"], x, key,
                                     baseline),
      params["encoder"], keys)


def parameter_groups(tree: PyTree) -> list[str]:
  """Group name of every leaf: its path without the last key ("kernel", "bias")."""
  names = []
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
    names.append("/".join(str(k) for k in keys[:-1]) or str(keys[-1]))
  return names


def mean_baseline(model_config: models.ModelConfig, params: PyTree,
                  images: jax.Array, rng: jax.Array,
                  num_samples: int) -> jax.Array:
  """The constant baseline: the minibatch mean of E_q[log p(x|z)] (fresh draws)."""
  mean, log_var, log_likelihood_fn = train.encode(model_config, params, images)
  terms = estimators.sgvb_b(rng, mean, log_var, log_likelihood_fn, num_samples)
  return jnp.mean(terms["reconstruction"])


def per_leaf_trace_cov(grads: PyTree, mean_gradient: PyTree) -> PyTree:
  """trace of the sample covariance of N estimates, per leaf.

  Args:
    grads: leaves [N, ...], N >= 2 estimates.
    mean_gradient: their mean, leaves [...].

  Returns:
    1/(N - 1) sum_n ||g_n - mean||^2 per leaf: the same number as
    `estimators.gradient_variance_stats(grads)["per_leaf"]["trace_cov"]`.
    The mean is passed in because XLA's CPU backend reduces over a leading
    axis of a large [N, ...] array about 50x slower than over all of it; the
    caller gets it from one extra backward pass instead.
  """
  def leaf(g, mean):
    num = g.shape[0]
    return jnp.sum(jnp.square(g - mean[None])) / (num - 1)
  return jax.tree.map(leaf, grads, mean_gradient)


def make_measure(model_config: models.ModelConfig,
                 combinations: tuple[tuple[str, int], ...],
                 num_draws: int, baseline_samples: int) -> Callable[..., dict]:
  """A jitted `measure(params, images [B, D], rng) -> sums`.

  Args:
    model_config: the VAE.
    combinations: the (estimator, L) pairs to measure; all in one program,
      each with its own key `fold_in(rng, 1 + position)`.
    num_draws: N, the estimates per example.
    baseline_samples: draws per example for the mean baseline (`mean_baseline`
      with key `fold_in(rng, 0)`), shared by the estimators that use it.

  Returns:
    The function; its result maps every (estimator, L) to, per leaf of the
    encoder, "trace_cov" (the sum over examples of trace Cov_n g_{i,n}) and
    "gradient_sum" (the sum over examples and draws of g_{i,n}), shaped like
    the encoder's tree (scalars and full leaves respectively). The examples
    are visited one after the other (`lax.scan`), so only one example's N
    gradients are alive at a time.
  """
  objectives = [example_objective(model_config, name, samples)
                for name, samples in combinations]

  def measure_one(objective, params, images, rng, baseline):
    keys = jax.random.split(rng, images.shape[0] * num_draws).reshape(
        images.shape[0], num_draws)
    zeros = jax.tree.map(jnp.zeros_like, params["encoder"])

    def one_example(gradient_sum, inputs):
      x, example_keys = inputs
      grads = per_draw_gradients(objective, params, x, example_keys, baseline)
      # The mean of the N per-draw gradients, as the gradient of the mean.
      mean_gradient = jax.grad(lambda encoder: jnp.mean(jax.vmap(
          lambda key: objective(encoder, params["decoder"], x, key, baseline))(
              example_keys)))(params["encoder"])
      trace_cov = per_leaf_trace_cov(grads, mean_gradient)
      gradient_sum = jax.tree.map(lambda s, g: s + num_draws * g,
                                  gradient_sum, mean_gradient)
      return gradient_sum, trace_cov

    gradient_sum, trace_covs = jax.lax.scan(one_example, zeros, (images, keys))
    return {"trace_cov": jax.tree.map(jnp.sum, trace_covs),
            "gradient_sum": gradient_sum}

  def measure(params, images, rng):
    baseline = mean_baseline(model_config, params, images,
                             jax.random.fold_in(rng, 0), baseline_samples)
    return {combination: measure_one(objective, params, images,
                                     jax.random.fold_in(rng, 1 + position),
                                     baseline)
            for position, (combination, objective)
            in enumerate(zip(combinations, objectives))}

  return jax.jit(measure)


@dataclasses.dataclass
class Measurement:
  """One estimator's statistics at one step, per parameter group and total."""
  estimator: str
  num_samples: int
  variance: dict[str, float]
  minibatch_variance: dict[str, float]
  mean_norm: dict[str, float]
  snr: dict[str, float]
  mean_gradient: dict[str, np.ndarray]  # per group, flattened
  # ||g||^2 estimated without bias from this estimator's mean, per group.
  squared_signal: dict[str, float] = dataclasses.field(default_factory=dict)
  unbiasedness: dict[str, float] = dataclasses.field(default_factory=dict)


def summarize(sums: dict, batch_size: int, num_draws: int, estimator: str,
              num_samples: int) -> Measurement:
  """Turns `make_measure`'s sums into per-group statistics (see module doc)."""
  sums = jax.device_get(sums)
  groups = parameter_groups(sums["trace_cov"])
  traces = jax.tree.leaves(sums["trace_cov"])
  means = [np.asarray(g, np.float64).reshape(-1) / (batch_size * num_draws)
           for g in jax.tree.leaves(sums["gradient_sum"])]
  by_group: dict[str, list[int]] = {}
  for index, group in enumerate(groups):
    by_group.setdefault(group, []).append(index)
  by_group[TOTAL] = list(range(len(groups)))
  result = Measurement(estimator, num_samples, {}, {}, {}, {}, {})
  for group, indices in by_group.items():
    variance = sum(float(traces[i]) for i in indices) / batch_size
    minibatch_variance = variance / batch_size
    mean_gradient = np.concatenate([means[i] for i in indices])
    squared_norm = float(np.sum(np.square(mean_gradient)))
    signal = max(squared_norm - minibatch_variance / num_draws, 0.0)
    result.variance[group] = variance
    result.minibatch_variance[group] = minibatch_variance
    result.mean_norm[group] = math.sqrt(squared_norm)
    result.squared_signal[group] = signal
    result.snr[group] = _snr(signal, minibatch_variance)
    result.mean_gradient[group] = mean_gradient
  return result


def _snr(squared_signal: float, variance: float) -> float:
  return math.sqrt(squared_signal / variance) if variance > 0 else math.inf


def compare_to_reparameterized(measurements: list[Measurement], batch_size: int,
                               num_draws: int) -> None:
  """Sets `unbiasedness` and the SNR's signal from the reparameterized one at each L."""
  reference = {m.num_samples: m for m in measurements
               if m.estimator == REPARAMETERIZED}
  for m in measurements:
    ref = reference.get(m.num_samples)
    if ref is None:
      continue
    for group, mean_gradient in m.mean_gradient.items():
      expected = (m.variance[group] + ref.variance[group]) / (batch_size * num_draws)
      difference = float(np.sum(np.square(mean_gradient - ref.mean_gradient[group])))
      m.unbiasedness[group] = difference / expected if expected > 0 else math.nan
      m.snr[group] = _snr(ref.squared_signal[group], m.minibatch_variance[group])


def measure_all(model_config: models.ModelConfig, params: PyTree,
                images: np.ndarray, rng: jax.Array, *,
                estimator_names: tuple[str, ...],
                num_samples: tuple[int, ...], num_draws: int,
                baseline_samples: int,
                measures: dict | None = None) -> list[Measurement]:
  """Every asked estimator at every L, on the minibatch `images` [B, D].

  Args:
    model_config: the VAE.
    params: its parameters (any device; they are copied to the default one).
    images: the fixed minibatch, [B, D].
    rng: key of this measurement (see `make_measure`).
    estimator_names: a subset of `ESTIMATORS`; the leave-one-out one is
      skipped for L = 1.
    num_samples: the L values.
    num_draws: N, the estimates per example.
    baseline_samples: draws per example for the mean baseline.
    measures: a cache of compiled `make_measure` functions, filled here.

  Returns:
    One `Measurement` per (estimator, L), compared to the reparameterized one.
  """
  measures = {} if measures is None else measures
  device = jax.devices()[0]
  # One device: the replicated training parameters would otherwise make jit
  # repeat the whole measurement on every device of the mesh.
  params = jax.device_put(jax.device_get(params), device)
  images = jax.device_put(np.asarray(images, np.float32), device)
  batch_size = images.shape[0]
  combinations = tuple((name, samples) for samples in num_samples
                       for name in estimator_names
                       if not (needs_two_samples(name) and samples < 2))
  if combinations not in measures:
    measures[combinations] = make_measure(model_config, combinations,
                                          num_draws, baseline_samples)
  all_sums = measures[combinations](params, images, rng)
  results = [summarize(all_sums[c], batch_size, num_draws, *c)
             for c in combinations]
  compare_to_reparameterized(results, batch_size, num_draws)
  return results


def rows(step: int, measurements: list[Measurement], *, batch_size: int,
         num_draws: int, test_elbo: float | None = None) -> list[dict]:
  """CSV rows of one step: one per (estimator, L, group)."""
  reference = {(m.num_samples, g): v for m in measurements
               if m.estimator == REPARAMETERIZED for g, v in m.variance.items()}
  out = []
  for m in measurements:
    for group in m.variance:
      ref = reference.get((m.num_samples, group))
      out.append({
          "step": step, "estimator": m.estimator, "num_samples": m.num_samples,
          "group": group, "variance": m.variance[group],
          "minibatch_variance": m.minibatch_variance[group],
          "mean_norm": m.mean_norm[group], "snr": m.snr[group],
          "ratio_to_reparameterized": (m.variance[group] / ref
                                       if ref else math.nan),
          "unbiasedness": m.unbiasedness.get(group, math.nan),
          "num_draws": num_draws, "batch_size": batch_size,
          "test_elbo": math.nan if test_elbo is None else test_elbo,
      })
  return out


# ----------------------------------------------------------------------------
# Outputs.


def write_csv(path: pathlib.Path, records: list[dict]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for record in records:
      writer.writerow(record)


def ratio_summary(records: list[dict]) -> dict[str, Any]:
  """Score-function / reparameterized variance ratios of the whole encoder.

  Per (estimator, L): the ratio at every measured step and its geometric
  mean, minimum and maximum over the steps.
  """
  summary: dict[str, Any] = {}
  for record in records:
    if record["group"] != TOTAL or record["estimator"] == REPARAMETERIZED:
      continue
    ratio = record["ratio_to_reparameterized"]
    entry = summary.setdefault(f"{record['estimator']}/L={record['num_samples']}",
                               {"steps": [], "ratios": []})
    entry["steps"].append(int(record["step"]))
    entry["ratios"].append(float(ratio))
  for entry in summary.values():
    ratios = np.asarray(entry["ratios"])
    finite = ratios[np.isfinite(ratios) & (ratios > 0)]
    entry["geometric_mean"] = float(np.exp(np.mean(np.log(finite)))) if finite.size else math.nan
    entry["min"] = float(np.min(ratios)) if ratios.size else math.nan
    entry["max"] = float(np.max(ratios)) if ratios.size else math.nan
  return summary


_COLORS = {REPARAMETERIZED: "tab:blue", SCORE_FUNCTION: "tab:red",
           MEAN_BASELINE: "tab:orange", LEAVE_ONE_OUT: "tab:green"}
_LINESTYLES = ("-", "--", ":", "-.")


def plot(path: pathlib.Path, records: list[dict], title: str = "") -> None:
  """Variance (log scale) and SNR of the whole encoder's gradient against steps.

  A third panel shows the variance per parameter group at the last step.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  totals = [r for r in records if r["group"] == TOTAL]
  series: dict[tuple[str, int], list[dict]] = {}
  for r in totals:
    series.setdefault((r["estimator"], int(r["num_samples"])), []).append(r)
  all_l = sorted({l for _, l in series})
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
  for (name, samples), points in sorted(series.items()):
    points = sorted(points, key=lambda r: r["step"])
    steps = [r["step"] for r in points]
    style = dict(color=_COLORS.get(name, "k"),
                 linestyle=_LINESTYLES[all_l.index(samples) % len(_LINESTYLES)],
                 marker="o", markersize=3, label=f"{name}, L={samples}")
    axes[0].plot(steps, [r["variance"] for r in points], **style)
    axes[1].plot(steps, [max(r["snr"], 1e-6) for r in points], **style)
  for ax, ylabel in zip(axes[:2], ("trace of the covariance of one example's "
                                   "encoder gradient", "SNR of the minibatch "
                                   "gradient")):
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=7)
  axes[0].set_title("gradient variance (encoder parameters)")
  axes[1].set_title("signal-to-noise ratio")

  last_step = max((r["step"] for r in records), default=0)
  last = [r for r in records if r["step"] == last_step and r["group"] != TOTAL]
  groups = sorted({r["group"] for r in last})
  keys = sorted({(r["estimator"], int(r["num_samples"])) for r in last})
  width = 0.8 / max(len(keys), 1)
  for k, (name, samples) in enumerate(keys):
    values = {r["group"]: r["variance"] for r in last
              if (r["estimator"], int(r["num_samples"])) == (name, samples)}
    axes[2].bar(np.arange(len(groups)) + k * width,
                [values.get(g, np.nan) for g in groups], width,
                color=_COLORS.get(name, "k"),
                alpha=1.0 - 0.5 * all_l.index(samples) / max(len(all_l), 1),
                label=f"{name}, L={samples}")
  axes[2].set_xticks(np.arange(len(groups)) + 0.4 - width / 2)
  axes[2].set_xticklabels(groups, fontsize=8)
  axes[2].set_yscale("log")
  axes[2].set_title(f"variance per parameter group, step {last_step}")
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------
# The study.


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `config.variance` (the rest is `config_utils.validate_config`'s).

  Raises:
    config_utils.ConfigError: naming the field, its value and the fix.
  """
  variance = config.variance

  def require(ok, field, value, fix):
    if not ok:
      raise config_utils.ConfigError(
          f"config.variance.{field}={value!r} is invalid: {fix}")

  names = tuple(variance.estimators)
  require(len(names) >= 1 and all(n in ESTIMATORS for n in names), "estimators",
          names, f"choose from {', '.join(ESTIMATORS)}")
  require(len(set(names)) == len(names), "estimators", names,
          "must not repeat a name")
  samples = tuple(variance.num_samples)
  require(len(samples) >= 1 and all(isinstance(s, int) and s >= 1 for s in samples),
          "num_samples", samples, "must be a tuple of L values >= 1, e.g. (1, 10)")
  require(not (names == (LEAVE_ONE_OUT,) and max(samples) < 2), "num_samples",
          samples, "the leave-one-out baseline needs L >= 2, e.g. (2,)")
  require(variance.num_draws >= 2, "num_draws", variance.num_draws,
          "needs >= 2 estimates per example for a variance")
  require(variance.batch_size >= 1, "batch_size", variance.batch_size,
          "must be >= 1")
  require(variance.num_points >= 1, "num_points", variance.num_points,
          "must be >= 1 log-spaced measurement steps")
  require(variance.baseline_samples >= 1, "baseline_samples",
          variance.baseline_samples, "must be >= 1")
  require(variance.eval_examples >= 1, "eval_examples", variance.eval_examples,
          "must be >= 1")
  if config.model.get("posterior", "gaussian") != "gaussian":
    raise config_utils.ConfigError(
        f"config.model.posterior={config.model.posterior!r} is invalid for "
        "the gradient-variance study: it compares estimators for the "
        "Gaussian q(z|x); use gaussian")
  sweep = config.get("sweep")
  if sweep is not None and sweep.get("axis") is not None:
    raise config_utils.ConfigError(
        f"config.sweep.axis={sweep.axis!r} is invalid for the "
        "gradient-variance study: it follows one run; unset it and start one "
        "run per seed")


def measurement_steps(num_steps: int, num_points: int) -> list[int]:
  """Step 0 and `num_points` log-spaced steps in [1, num_steps], deduplicated."""
  points = np.geomspace(1, max(num_steps, 1), num_points) if num_points > 1 else [num_steps]
  return sorted({0, *(int(round(p)) for p in points)} | {num_steps})


def _read_records(path: pathlib.Path) -> list[dict]:
  """The measured rows so far; a step measured twice keeps its last rows."""
  if not path.exists():
    return []
  by_key: dict[tuple, dict] = {}
  for line in path.read_text().splitlines():
    if line.strip():
      r = json.loads(line)
      by_key[(r["step"], r["estimator"], r["num_samples"], r["group"])] = r
  return sorted(by_key.values(), key=lambda r: (r["step"], r["estimator"],
                                                 r["num_samples"], r["group"]))


def advance(loop: train.TrainLoop, target: int, per_call: int) -> None:
  """Runs the loop towards `target` in dispatches of 1 or steps_per_call steps.

  The device program is compiled once per distinct step count, so the
  log-spaced targets are reached with single steps up to the next multiple
  of `per_call` (the loop's steps_per_call), then whole calls, then single
  steps: two programs in all. One dispatch per call.
  """
  if loop.step % per_call or target - loop.step < per_call:
    loop.run(loop.step + 1)
  else:
    loop.run(loop.step + per_call)


def run_study(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains a VAE with AEVB and measures the encoder-gradient variances along the way.

  A run started on a workdir that holds a checkpoint resumes from it (the
  measurements already taken are kept in `gradient_variance.jsonl`). Ctrl-C
  or SIGTERM saves a checkpoint first.

  Args:
    config: see experiments/configs/gradient_variance.py.
    workdir: receives checkpoints/, metrics.jsonl (training), TensorBoard
      events, gradient_variance.jsonl / .csv / .png and summary.json
      (process 0 writes).

  Returns:
    The summary written to `workdir/summary.json`.
  """
  from avb import data as data_lib  # pylint: disable=g-import-not-at-top
  from avb import writers  # pylint: disable=g-import-not-at-top

  wall_start = time.time()
  validate(config)
  mesh = train.make_mesh()
  workdir_path = config_utils.check_workdir(workdir)
  is_writer = jax.process_index() == 0
  variance = config.variance

  dataset = data_lib.load_dataset(
      config.data.name, source=config.data.source,
      data_dir=config.data.data_dir, tfds_data_dir=config.data.tfds_data_dir,
      seed=config.seed, train_size=config.data.train_size,
      test_size=config.data.test_size)
  logging.info("Data:\n%s", dataset.describe())
  num_shards = mesh.size
  batch_size = config.training.batch_size
  per_shard = input_pipeline.shard_size(dataset.train.images.shape[0],
                                        num_shards, batch_size)
  num_train = per_shard * num_shards
  train_images = dataset.train.images[input_pipeline.process_rows(
      dataset.train.images.shape[0], num_shards)]
  # The fixed minibatch: training examples picked once by the run's seed.
  picker = np.random.default_rng(config.seed + 7)
  chosen = picker.choice(dataset.train.images.shape[0],
                         min(variance.batch_size, dataset.train.images.shape[0]),
                         replace=False)
  fixed_batch = dataset.train.images[np.sort(chosen)]
  fixed_batch = fixed_batch.reshape(fixed_batch.shape[0], -1)
  eval_images = dataset.test.images[:variance.eval_examples]

  model_config = models.ModelConfig.from_config(config.model, dataset.image_shape)
  tx = train.make_optimizer(config.optimizer)
  replicated, sharded = train.shardings(mesh)
  state = jax.device_put(
      train.create_train_state(model_config, tx, config.seed,
                               train.objective_hyperparameters(config.objective)),
      replicated)
  manager = train.checkpoint_manager(workdir_path,
                                     config.training.max_checkpoints_to_keep)
  latest = manager.latest_step()
  if latest is not None:
    state = train.resume(manager, latest, state, workdir)
  elif is_writer:
    writers.write_json(workdir_path / "config.json", config.to_dict())
  initial_step = latest if latest is not None else 0

  train_step = train.make_train_step(
      train.aevb_loss(model_config, config, num_train), tx,
      dynamic_binarization=config.data.dynamic_binarization)
  loop = train.TrainLoop(
      state, initial_step,
      device_steps=train.make_device_steps(train_step, mesh,
                                           batch_size=batch_size,
                                           per_shard=per_shard),
      data=input_pipeline.device_dataset(train_images, num_shards, sharded),
      steps_per_call=config.training.steps_per_call)
  elbo_sums, _ = train.make_eval_fns(model_config, config, mesh)
  eval_key = random_streams.key(config.seed, random_streams.Stream.EVAL)
  measure_key = random_streams.key(config.seed,
                                  random_streams.Stream.GRADIENT_VARIANCE)

  logger = writers.MetricLogger(workdir_path,
                               num_steps=config.training.num_steps)
  records_path = workdir_path / "gradient_variance.jsonl"
  records = _read_records(records_path)
  measured = {r["step"] for r in records}
  num_steps = config.training.num_steps
  schedule = measurement_steps(num_steps, variance.num_points)
  measures: dict = {}
  estimator_names = tuple(variance.estimators)
  num_samples = tuple(int(s) for s in variance.num_samples)

  def measure_here(step: int) -> None:
    check_finite()
    test = train.elbo_summary(train.evaluate(
        elbo_sums, loop.state.params, eval_images, config.eval.batch_size,
        eval_key, sharded))
    start = time.time()
    results = measure_all(
        model_config, loop.state.params, fixed_batch,
        jax.random.fold_in(measure_key, step), estimator_names=estimator_names,
        num_samples=num_samples, num_draws=variance.num_draws,
        baseline_samples=variance.baseline_samples, measures=measures)
    new = rows(step, results, batch_size=fixed_batch.shape[0],
               num_draws=variance.num_draws, test_elbo=float(test["elbo"]))
    scalars = {"elbo": test["elbo"], "seconds": time.time() - start}
    for r in new:
      if r["group"] == TOTAL:
        prefix = f"{r['estimator']}/L={r['num_samples']}"
        scalars[f"{prefix}/variance"] = r["variance"]
        scalars[f"{prefix}/snr"] = r["snr"]
        scalars[f"{prefix}/ratio"] = r["ratio_to_reparameterized"]
    logger.write(step, scalars, "variance")
    if is_writer:
      with open(records_path, "a") as f:
        for r in new:
          f.write(json.dumps(r) + "\n")
    records.extend(new)
    measured.add(step)

  def check_finite() -> None:
    if int(np.asarray(loop.state.bad_step)) >= 0:
      raise train.NonFiniteError(
          f"non-finite loss or gradient at step {int(loop.state.bad_step)}; "
          f"stopped. The last good checkpoint ({manager.latest_step()}) in "
          f"{manager.directory} is intact. Try a smaller "
          "--config.optimizer.learning_rate.")

  log_every = config.training.log_every
  interval_start, interval_step = time.time(), initial_step
  try:
    if initial_step == 0 and 0 not in measured:
      measure_here(0)
    for target in [s for s in schedule if s > initial_step]:
      while loop.step < target:
        advance(loop, target, config.training.steps_per_call)
        if loop.step % log_every == 0 or loop.step == target:
          check_finite()
          means = loop.pop_metrics()
          rate = (loop.step - interval_step) / max(time.time() - interval_start, 1e-9)
          logger.write(loop.step, {**means, "steps_per_sec": rate,
                                         "eta_seconds": (num_steps - loop.step) / max(rate, 1e-9)},
                             "train")
          interval_start, interval_step = time.time(), loop.step
      if target not in measured:
        measure_here(target)
      check_finite()
      train.save_checkpoint(manager, loop.state)
  except KeyboardInterrupt:
    try:
      if loop.step > initial_step and int(loop.state.bad_step) < 0:
        train.save_checkpoint(manager, loop.state)
        manager.wait_until_finished()
        logging.warning("Interrupted: saved a checkpoint at step %d.", loop.step)
    except RuntimeError as e:  # interrupted mid-dispatch: buffers donated
      logging.warning("Interrupted; no new checkpoint (%s).", e)
    raise
  manager.wait_until_finished()
  manager.close()

  records = sorted(records, key=lambda r: (r["step"], r["estimator"],
                                           r["num_samples"], r["group"]))
  ratios = ratio_summary(records)
  summary = {
      "dataset": config.data.name,
      "data_sources": {"train": dataset.train.source, "test": dataset.test.source},
      "num_train": num_train,
      "num_latents": model_config.num_latents,
      "hidden_sizes": list(model_config.hidden_sizes),
      "steps": loop.step,
      "training_batch_size": batch_size,
      "measured_steps": sorted({int(r["step"]) for r in records}),
      "variance_batch_size": int(fixed_batch.shape[0]),
      "num_draws": variance.num_draws,
      "num_samples": list(num_samples),
      "estimators": list(estimator_names),
      "compared_parameters": "encoder (variational) only; the decoder "
                             "gradient is pathwise in every estimator",
      "variance_ratio_to_reparameterized": ratios,
      "final": {f"{r['estimator']}/L={r['num_samples']}": {
          "variance": r["variance"], "snr": r["snr"],
          "ratio_to_reparameterized": r["ratio_to_reparameterized"],
          "unbiasedness": r["unbiasedness"]}
                for r in records if r["group"] == TOTAL and r["step"] == loop.step},
      "final_test_elbo": next((r["test_elbo"] for r in records
                               if r["step"] == loop.step), None),
      "wall_time_s": time.time() - wall_start,
  }
  if is_writer:
    write_csv(workdir_path / "gradient_variance.csv", records)
    plot(workdir_path / "gradient_variance.png", records,
         title=(f"MNIST VAE (J={model_config.num_latents}, "
                f"hidden={list(model_config.hidden_sizes)}), fixed minibatch "
                f"B={fixed_batch.shape[0]}, N={variance.num_draws} estimates "
                "per example; encoder parameters"))
  writers.write_json(workdir_path / "summary.json", summary)
  logger.flush()
  logger.close()
  logging.info("Summary: %s", workdir_path / "summary.json")
  return summary
