r"""Steady-state training throughput of the MNIST AEVB step (a benchmark).

Measures examples/s, after compilation, of the training step exactly as
`python -m experiments.mnist --config=experiments/configs/mnist.py` runs it:
the default MNIST config (784-500 tanh-20 MLPs, Bernoulli decoder, estimator
B, L=1, minibatch 100, Adagrad 0.02, float32), built with the library's own
`avb.train` functions, on the 10,000 real MNIST test images.

Variants, interleaved within each measured pair so that the machine's drift
(20-40% run to run on a shared 2-core CPU) hits all of them alike:

  A  loop:      the per-step work of `train.train_and_evaluate`'s loop: host
                gather of the minibatch from a numpy array, `to_global`, the
                jitted step, `_accumulate` of the metrics. No logging,
                evaluation or checkpoint I/O.
  B  reference: the same jitted step fed pre-sliced device batches: no host
                gather, no transfer, no accumulation. A / B is the host-side
                overhead of the loop.
  C  sync:      B with `jax.block_until_ready` after every step, so C / B shows
                what asynchronous dispatch buys.

Each sample is one epoch (num_examples / batch_size steps, 100 by default)
timed to a `block_until_ready` at its end. Results quote the median and the
min-max range over pairs, and ratios are medians of per-pair ratios, which
cancel the slow drift better than a ratio of medians.

Also reported: the model's matmul FLOPs per example (counted exactly, see
`matmul_flops_per_example`), the achieved GFLOP/s, and the machine's
achievable float32 matmul GFLOP/s from a large jitted `jnp.matmul`.

Commands:
  python -m benchmarks.train_throughput
  python -m benchmarks.train_throughput --epochs=10 --json=/tmp/throughput.json
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
      python -m benchmarks.train_throughput --devices=2

On a CPU host jax sees one device (using all cores) unless XLA_FLAGS forces
more, as the last command does. Both A and B keep at most
`train._MAX_STEPS_IN_FLIGHT` steps queued, as the training loop does: with
more than one CPU device, XLA:CPU aborts ("Termination timeout for all
reduce") once a few dozen steps are queued without a sync.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from avb import data as data_lib
from avb import models
from avb import train
from experiments.configs import mnist as mnist_config

_IMAGES_FILE = pathlib.Path("mnist") / "t10k-images-idx3-ubyte.gz"
_VARIANTS = {
    "A": "loop: host gather + to_global + step + accumulate",
    "B": "reference: step on pre-sliced device batches",
    "C": "sync: reference + block_until_ready every step",
}
_REFERENCE = "B"


# ----------------------------------------------------------------------------
# FLOPs.


def matmul_flops_per_example(model_config: models.ModelConfig,
                             num_samples: int) -> dict[str, int]:
  """Exact matmul FLOPs of one training example (forward + backward).

  A dense layer with m inputs and n outputs costs, per example:
    * forward  y = x W:        2*m*n (m*n multiply-adds);
    * backward dW = x^T g:     2*m*n (every layer has trainable weights);
    * backward dx = g W^T:     2*m*n for every layer except the encoder's
      first, whose input is the data, which is not differentiated. The
      decoder's first layer does need it: z = mean + exp(log_var / 2) * eps
      carries the gradient back into the encoder (the reparameterization).
  The encoder runs once per example, the decoder once per sample (L times).
  The mean and log-variance heads are two m x J layers.

  Not counted: bias adds, activations, the likelihood, the KL, the weight
  prior and Adagrad's update. They are elementwise, O(D + H) per example or
  O(#params) per step, and small beside the matmuls (XLA's own count, printed
  beside this one, includes them).

  Args:
    model_config: the model.
    num_samples: L, decoder passes per example.

  Returns:
    {"forward", "weight_grads", "input_grads", "total"} in FLOPs per example.
  """
  sizes = (model_config.data_dim, *model_config.hidden_sizes)
  encoder = list(zip(sizes[:-1], sizes[1:]))
  encoder += [(sizes[-1], model_config.num_latents)] * 2  # mean, log_var heads
  decoder_sizes = (model_config.num_latents,
                   *reversed(model_config.hidden_sizes))
  decoder = list(zip(decoder_sizes[:-1], decoder_sizes[1:]))
  # Bernoulli: logits; Gaussian: mean and log_var.
  heads = 1 if model_config.likelihood == "bernoulli" else 2
  decoder += [(decoder_sizes[-1], model_config.data_dim)] * heads

  def cost(layers):
    return sum(2 * m * n for m, n in layers)

  forward = cost(encoder) + num_samples * cost(decoder)
  weight_grads = forward
  input_grads = cost(encoder[1:]) + num_samples * cost(decoder)
  return {"forward": forward, "weight_grads": weight_grads,
          "input_grads": input_grads,
          "total": forward + weight_grads + input_grads}


def xla_flops(jitted: Callable, *args) -> float | None:
  """XLA's own FLOP count of one call, or None where the backend gives none."""
  try:
    cost = jitted.lower(*args).compile().cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def matmul_gflops(size: int, repeats: int) -> list[float]:
  """Achievable float32 GFLOP/s: timings of a jitted size x size matmul."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (size, size), jnp.float32)
  b = jax.random.normal(key_b, (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))  # compile and warm the caches
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    rates.append(2 * size**3 / (time.perf_counter() - start) / 1e9)
  return rates


# ----------------------------------------------------------------------------
# The benchmark.


def load_images(data_dir: pathlib.Path) -> np.ndarray:
  """The 10,000 MNIST test images as float32 [N, 28, 28] in [0, 1]."""
  images = data_lib.read_idx(data_dir / _IMAGES_FILE)
  return images.astype(np.float32) / np.float32(255.0)


class Benchmark:
  """The training step of `train.train_and_evaluate`, timed one epoch at a time.

  All variants advance one shared train state, so each epoch starts where the
  previous one stopped, as in a real run; the host step counter follows
  `state.step` and picks the loop's minibatches through `MinibatchOrder`.
  """

  def __init__(self, images: np.ndarray, batch_size: int,
               devices: list[jax.Device]):
    config = mnist_config.get_config()
    self.config = config
    self.model_config = models.ModelConfig.from_config(config.model,
                                                       images.shape[1:])
    self.images = images
    self.batch_size = batch_size
    num_train = images.shape[0]

    mesh = train.make_mesh(devices)
    replicated, self.sharded = train.shardings(mesh)
    tx = train.make_optimizer(config.optimizer)
    init_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    self.state = jax.device_put(
        train.create_train_state(self.model_config, tx, init_rng), replicated)
    self.train_step = train.jit_train_step(
        train.make_train_step(self.model_config, config, tx, num_train), mesh)
    self.order = train.MinibatchOrder(num_train, batch_size, config.seed)
    self.steps_per_epoch = self.order.steps_per_epoch
    self.step = 0
    # The reference's batches: one epoch's, placed on device before timing.
    self.device_batches = [
        {"image": train.to_global(images[self.order.indices(s)], self.sharded)}
        for s in range(self.steps_per_epoch)]
    jax.block_until_ready(self.device_batches)

  def compile_seconds(self) -> float:
    """Runs (and times) the first step, which compiles it."""
    start = time.perf_counter()
    self.state, metrics = self.train_step(self.state, self.device_batches[0])
    jax.block_until_ready((self.state, metrics))
    self.step += 1
    return time.perf_counter() - start

  def step_flops(self) -> float | None:
    return xla_flops(self.train_step, self.state, self.device_batches[0])

  def run_epoch(self, variant: str) -> float:
    """One epoch of `variant`; returns its examples/s."""
    run = {"A": self._loop_epoch, "B": self._reference_epoch,
           "C": self._sync_epoch}[variant]
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    self.step += self.steps_per_epoch
    return self.steps_per_epoch * self.batch_size / seconds

  def _loop_epoch(self) -> None:
    # The training loop's own host side (train.TrainLoop.run), minus logging
    # and checkpoints; it syncs on the summed metrics when it logs, as here.
    loop = train.TrainLoop(self.train_step, self.state, self.images,
                           self.order, self.sharded, self.step)
    loop.run(self.step + self.steps_per_epoch)
    loop.block_until_ready()
    self.state = loop.state

  def _reference_epoch(self) -> None:
    state = self.state
    in_flight = collections.deque()
    for batch in self.device_batches:
      state, metrics = self.train_step(state, batch)
      # The same bound on queued steps as the loop (XLA:CPU multi-device
      # steps abort when dozens are queued); free on one device.
      in_flight.append(metrics["loss"])
      if len(in_flight) > train._MAX_STEPS_IN_FLIGHT:  # pylint: disable=protected-access
        in_flight.popleft().block_until_ready()
    jax.block_until_ready(state)
    self.state = state

  def _sync_epoch(self) -> None:
    state = self.state
    for batch in self.device_batches:
      state, metrics = self.train_step(state, batch)
      jax.block_until_ready((state, metrics))
    self.state = state


def summarize(samples: list[float]) -> dict[str, float]:
  return {"median": statistics.median(samples), "min": min(samples),
          "max": max(samples)}


def environment(devices: list[jax.Device]) -> dict[str, object]:
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    affinity = None
  return {
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": _jaxlib_version(),
      "numpy": np.__version__,
      "platform": devices[0].platform,
      "device_kind": devices[0].device_kind,
      "devices_used": len(devices),
      "devices_available": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "cpus_usable": affinity,
      "machine": platform.machine(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def _jaxlib_version() -> str | None:
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
    return jaxlib.__version__
  except ImportError:
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--epochs", type=int, default=5,
                      help="measured epochs per variant, interleaved A B C "
                      "(default 5)")
  parser.add_argument("--batch-size", type=int, default=100,
                      help="minibatch size M (default 100, the config's)")
  parser.add_argument("--devices", type=int, default=None,
                      help="use the first N jax devices (default: all)")
  parser.add_argument("--variants", default="ABC",
                      help="which variants to time, from A, B, C "
                      "(default ABC; B is the reference and always runs)")
  parser.add_argument("--matmul-size", type=int, default=2048,
                      help="side of the square float32 matmul (default 2048)")
  parser.add_argument("--matmul-repeats", type=int, default=10,
                      help="timed matmuls; the median is quoted (default 10)")
  parser.add_argument("--data-dir", type=pathlib.Path, default=None,
                      help="holds mnist/t10k-images-idx3-ubyte.gz (default: "
                      "$AVB_DATA_DIR, else ../shared/data)")
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="also write the results to this JSON file")
  args = parser.parse_args(argv)
  if args.epochs < 1:
    parser.error(f"--epochs={args.epochs} must be at least 1")
  unknown = set(args.variants) - set(_VARIANTS)
  if unknown or not args.variants:
    parser.error(f"--variants={args.variants!r}: choose from "
                 f"{''.join(_VARIANTS)}")
  # The ratios are to B, so it must be measured in every pair.
  args.variants = "".join(v for v in _VARIANTS
                          if v in args.variants or v == _REFERENCE)
  return args


def main(argv: list[str] | None = None) -> dict[str, object]:
  args = parse_args(argv)
  all_devices = jax.devices()
  num_devices = args.devices or len(all_devices)
  if not 1 <= num_devices <= len(all_devices):
    sys.exit(f"--devices={num_devices}: jax sees {len(all_devices)} device(s); "
             "on a CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N "
             "for more")
  if args.batch_size % num_devices:
    sys.exit(f"--batch-size={args.batch_size} must be a multiple of the "
             f"{num_devices} devices, which each take an equal shard")
  devices = all_devices[:num_devices]

  data_dir = args.data_dir or data_lib.default_data_dir()
  try:
    images = load_images(data_dir)
  except data_lib.DataError as e:
    sys.exit(f"{e} (set --data-dir or $AVB_DATA_DIR)")
  if args.batch_size > images.shape[0]:
    sys.exit(f"--batch-size={args.batch_size} exceeds the "
             f"{images.shape[0]} images")

  env = environment(devices)
  print(f"Environment: jax {env['jax']} (jaxlib {env['jaxlib']}), "
        f"{env['devices_used']} of {env['devices_available']} "
        f"{env['platform']} device(s) ({env['device_kind']}), "
        f"{env['cpu_count']} CPUs ({env['cpus_usable']} usable), "
        f"python {env['python']}", flush=True)

  bench = Benchmark(images, args.batch_size, devices)
  compile_s = bench.compile_seconds()
  xla_step_flops = bench.step_flops()
  # XLA counts the per-device SPMD program, which sees batch_size / devices
  # examples.
  xla_flops_per_example = (None if xla_step_flops is None
                           else xla_step_flops * num_devices / args.batch_size)
  # Warm-up: every variant once, so `_accumulate` is compiled and caches,
  # allocator and thread pools are in their steady state before timing.
  for variant in args.variants:
    bench.run_epoch(variant)

  samples = {v: [] for v in args.variants}
  for pair in range(args.epochs):
    for variant in args.variants:
      samples[variant].append(bench.run_epoch(variant))
    print(f"  pair {pair + 1}/{args.epochs}: " + ", ".join(
        f"{v} {samples[v][-1]:,.0f}" for v in args.variants) + " examples/s",
          flush=True)
  if int(bench.state.bad_step) >= 0:
    print(f"warning: the loss became non-finite at step "
          f"{int(bench.state.bad_step)}; later steps skipped the update")

  matmul_rates = matmul_gflops(args.matmul_size, args.matmul_repeats)
  flops = matmul_flops_per_example(bench.model_config,
                                   bench.config.objective.num_samples)

  reference = samples[_REFERENCE]
  results = {}
  for variant in args.variants:
    ratios = [s / r for s, r in zip(samples[variant], reference)]
    median_rate = statistics.median(samples[variant])
    results[variant] = {
        "description": _VARIANTS[variant],
        "examples_per_sec": samples[variant],
        **{f"examples_per_sec_{k}": v
           for k, v in summarize(samples[variant]).items()},
        "ratio_to_reference": ratios,
        **{f"ratio_to_reference_{k}": v for k, v in summarize(ratios).items()},
        "ms_per_step_median": 1e3 * args.batch_size / median_rate,
        "gflops_per_sec_median": median_rate * flops["total"] / 1e9,
    }
  matmul_median = statistics.median(matmul_rates)

  print()
  print(f"MNIST AEVB training throughput: default config "
        f"({bench.model_config.data_dim}-"
        f"{'-'.join(map(str, bench.model_config.hidden_sizes))} "
        f"{bench.model_config.activation}-{bench.model_config.num_latents}, "
        f"{bench.model_config.likelihood}, estimator "
        f"{bench.config.objective.estimator}, "
        f"L={bench.config.objective.num_samples}, M={args.batch_size}, "
        f"{bench.config.optimizer.name} "
        f"{bench.config.optimizer.learning_rate}, "
        f"float32); {images.shape[0]:,} MNIST test images, "
        f"{bench.steps_per_epoch} steps per epoch; {args.epochs} interleaved "
        f"epochs per variant after a warm-up epoch.")
  print()
  print("| variant | examples/s median | min | max "
        "| ratio to reference (median of per-pair, min-max) |")
  print("|---|---:|---:|---:|---:|")
  for variant, result in results.items():
    ratio = ("1 (reference)" if variant == _REFERENCE else
             f"{result['ratio_to_reference_median']:.3f} "
             f"({result['ratio_to_reference_min']:.3f}-"
             f"{result['ratio_to_reference_max']:.3f})")
    print(f"| {variant}: {result['description']} "
          f"| {result['examples_per_sec_median']:,.0f} "
          f"| {result['examples_per_sec_min']:,.0f} "
          f"| {result['examples_per_sec_max']:,.0f} | {ratio} |")
  print()
  print("| quantity | value |")
  print("|---|---:|")
  print(f"| matmul FLOPs per example: forward | {flops['forward']:,} |")
  print(f"| matmul FLOPs per example: weight gradients | "
        f"{flops['weight_grads']:,} |")
  print(f"| matmul FLOPs per example: input gradients (all layers but the "
        f"first) | {flops['input_grads']:,} |")
  print(f"| matmul FLOPs per example: total | {flops['total']:,} |")
  if xla_flops_per_example is not None:
    print(f"| XLA cost_analysis FLOPs per example (all ops, cross-check) | "
          f"{xla_flops_per_example:,.0f} |")
  for variant, result in results.items():
    print(f"| achieved GFLOP/s, {variant} (median) | "
          f"{result['gflops_per_sec_median']:.2f} |")
  print(f"| float32 matmul {args.matmul_size}x{args.matmul_size}, jitted: "
        f"GFLOP/s median (min-max of {args.matmul_repeats}) | "
        f"{matmul_median:.1f} ({min(matmul_rates):.1f}-"
        f"{max(matmul_rates):.1f}) |")
  for variant, result in results.items():
    print(f"| fraction of matmul GFLOP/s, {variant} | "
          f"{result['gflops_per_sec_median'] / matmul_median:.1%} |")
  print("| ms per step (median), A / B | "
        + " / ".join(f"{results[v]['ms_per_step_median']:.2f}"
                     for v in ("A", _REFERENCE) if v in results) + " |")
  print(f"| first step (compilation), s | {compile_s:.2f} |")
  print()
  print(f"Environment: jax {env['jax']}, jaxlib {env['jaxlib']}, "
        f"numpy {env['numpy']}, python {env['python']}; "
        f"{env['devices_used']} of {env['devices_available']} device(s), "
        f"kind {env['device_kind']!r} ({env['platform']}); "
        f"os.cpu_count()={env['cpu_count']}, usable CPUs={env['cpus_usable']}; "
        f"XLA_FLAGS={env['xla_flags']!r}")

  report = {
      "environment": env,
      "settings": {"epochs": args.epochs, "batch_size": args.batch_size,
                   "steps_per_epoch": bench.steps_per_epoch,
                   "num_images": int(images.shape[0]),
                   "images": str(data_dir / _IMAGES_FILE),
                   "model": {"data_dim": bench.model_config.data_dim,
                             "hidden_sizes": bench.model_config.hidden_sizes,
                             "num_latents": bench.model_config.num_latents,
                             "likelihood": bench.model_config.likelihood},
                   "estimator": bench.config.objective.estimator,
                   "num_samples": bench.config.objective.num_samples,
                   "optimizer": bench.config.optimizer.name,
                   "learning_rate": bench.config.optimizer.learning_rate},
      "variants": results,
      "reference": _REFERENCE,
      "matmul_flops_per_example": flops,
      "xla_flops_per_example": xla_flops_per_example,
      "matmul_benchmark": {"size": args.matmul_size,
                           "gflops_per_sec": matmul_rates,
                           "gflops_per_sec_median": matmul_median},
      "compile_seconds": compile_s,
  }
  if args.json is not None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"Wrote {args.json}")
  return report


if __name__ == "__main__":
  main()
