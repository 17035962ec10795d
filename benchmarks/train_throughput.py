r"""Training throughput of avb's AEVB MNIST step against PyTorch and the machine.

The benchmark work: the AEVB MNIST model (784-500 tanh-20 MLPs, Bernoulli
decoder, estimator B, L = 1, minibatch 100, Adagrad 0.02 with a zero initial
accumulator, float32, N(0, I) weight prior over N) trained on the 10,000 real
MNIST test images. One sample is one epoch (100 steps) timed to a sync at its
end. Variants, run in rounds so that every round times each once (A B C ... A
B C ...) and the machine's drift hits all alike:

  avb            `python -m experiments.mnist` exactly: `train.TrainLoop` with
                 the device-resident epoch (shuffle and slicing inside the
                 program, 100 steps per dispatch, metrics summed on device).
  avb_streamed   the same step fed by the host pipeline
                 (`input_pipeline.Prefetcher`): the path of large datasets.
                 Its time blocked on the prefetcher is the input wait.
  avb_sweep8     8 seeds in one program (`vmap` over the state), one epoch of
                 each; its time / avb's is the cost of 8 runs against 1.
  torch_eager    `benchmarks/torch_reference.py`: the identical model and step
                 in idiomatic eager PyTorch.
  torch_compiled the same with `torch.compile` (model+loss, and the update).

Reported: examples/s median and min-max over rounds; per-round paired ratios
(avb / torch_*, avb_sweep8 time / avb time, ...) with their median and range;
the model's exact matmul FLOPs per example; the machine's float32 matmul
GFLOP/s (a large jitted matmul) and avb's fraction of it; the input wait;
peak memory. `--results` writes benchmarks/RESULTS.md.

Commands:
  python -m benchmarks.train_throughput --rounds=7 --results=benchmarks/RESULTS.md
  python -m benchmarks.train_throughput --variants=avb,torch_eager --rounds=3
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
      python -m benchmarks.train_throughput --devices=2

PyTorch is a benchmark-only dependency (`pip install torch==2.13.0`, CPU
wheel); without it the torch variants are skipped with a note.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from avb import data as data_lib
from avb import input_pipeline
from avb import models
from avb import train
from experiments.configs import mnist as mnist_config

_IMAGES_FILE = pathlib.Path("mnist") / "t10k-images-idx3-ubyte.gz"
VARIANTS = ("avb", "avb_streamed", "avb_sweep8", "torch_eager", "torch_compiled")
_SWEEP = 8
_ANALYSIS_MARKER = "<!-- analysis: kept across reruns -->"
# The targets: (name, ratio key or quantity, threshold, direction).
_TARGETS = (
    ("avb >= 2x PyTorch eager", "avb / torch_eager (examples/s)", 2.0, ">="),
    ("avb >= 1.5x torch.compile", "avb / torch_compiled (examples/s)", 1.5, ">="),
    ("avb >= 60% of the matmul peak", "matmul_fraction", 0.60, ">="),
    ("8 vmapped seeds <= 3x one run's time",
     "avb_sweep8 time / avb time (8 runs vs 1)", 3.0, "<="),
    ("input wait < 5% of step time", "input_wait", 0.05, "<"),
)


# ----------------------------------------------------------------------------
# FLOPs and the machine.


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
  So a step costs about 2.5x the forward, not 3x. The encoder runs once per
  example, the decoder once per sample (L times); the mean and log-variance
  heads are two m x J layers.

  Not counted: bias adds, activations, the likelihood, the KL, the weight
  prior and Adagrad's update: elementwise, O(D + H) per example or
  O(#params) per step, and small beside the matmuls.

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


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_peak_mib(device: jax.Device) -> float | None:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**20


# ----------------------------------------------------------------------------
# The avb variants: the library's own functions, as train_and_evaluate uses them.


class AvbTrainer:
  """One avb training run on the benchmark data, advanced an epoch at a time."""

  def __init__(self, images: np.ndarray, mesh: jax.sharding.Mesh, *,
               streamed: bool = False, num_runs: int | None = None):
    config = mnist_config.get_config()
    self.config = config
    self.model_config = models.ModelConfig.from_config(config.model,
                                                       images.shape[1:])
    batch_size = config.training.batch_size
    num_shards = mesh.size
    per_shard = input_pipeline.shard_size(len(images), num_shards, batch_size)
    self.steps_per_epoch = per_shard // (batch_size // num_shards)
    self.examples_per_epoch = self.steps_per_epoch * batch_size * (num_runs or 1)
    replicated, sharded = train.shardings(mesh)
    tx = train.make_optimizer(config.optimizer)
    hyper = train.objective_hyperparameters(config.objective)
    if num_runs is None:
      state = train.create_train_state(self.model_config, tx, config.seed, hyper)
    else:
      runs = [train.Run(str(s), s, config.optimizer.learning_rate, hyper)
              for s in range(num_runs)]
      state = train.create_states(runs, True, self.model_config, tx)
    state = jax.device_put(state, replicated)
    step = train.make_train_step(
        train.aevb_loss(self.model_config, config, num_shards * per_shard), tx)
    self.prefetcher = None
    if streamed:
      order = input_pipeline.HostOrder(config.seed, num_shards, per_shard,
                                       batch_size)
      self.prefetcher = input_pipeline.Prefetcher(images, order, sharded, 0)
      self.loop = train.TrainLoop(state, 0, prefetcher=self.prefetcher,
                                  train_step=train.jit_train_step(step, mesh,
                                                                  num_runs))
    else:
      self.loop = train.TrainLoop(
          state, 0,
          device_steps=train.make_device_steps(
              step, mesh, batch_size=batch_size, per_shard=per_shard,
              num_runs=num_runs),
          data=input_pipeline.device_dataset(images, num_shards, sharded),
          steps_per_call=config.training.steps_per_call)
    self.last_wait = 0.0

  def run_epoch(self) -> float:
    if self.prefetcher is not None:
      self.prefetcher.wait_seconds = 0.0
    start = time.perf_counter()
    self.loop.run(self.loop.step + self.steps_per_epoch)
    self.loop.block_until_ready()
    seconds = time.perf_counter() - start
    self.metrics = self.loop.pop_metrics()
    if self.prefetcher is not None:
      self.last_wait = self.prefetcher.wait_seconds / seconds
    return seconds

  def close(self) -> None:
    if self.prefetcher is not None:
      self.prefetcher.close()


class TorchTrainer:
  """Adapter to benchmarks/torch_reference.py with the same interface."""

  def __init__(self, images: np.ndarray, variant: str):
    from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
    self._trainer = torch_reference.make_trainer(
        images.reshape(len(images), -1), variant.removeprefix("torch_"))
    self._trainer.warmup()
    self.examples_per_epoch = (len(images) // 100) * 100
    self.last_wait = 0.0

  def run_epoch(self) -> float:
    seconds = self._trainer.run_epoch()
    self.metrics = self._trainer.metrics()
    return seconds

  def close(self) -> None:
    pass


def make_trainer(variant: str, images: np.ndarray, mesh) -> Any:
  if variant == "avb":
    return AvbTrainer(images, mesh)
  if variant == "avb_streamed":
    return AvbTrainer(images, mesh, streamed=True)
  if variant == "avb_sweep8":
    return AvbTrainer(images, mesh, num_runs=_SWEEP)
  return TorchTrainer(images, variant)


# ----------------------------------------------------------------------------
# The run.


def summarize(samples: list[float]) -> dict[str, float]:
  return {"median": statistics.median(samples), "min": min(samples),
          "max": max(samples)}


def environment(devices: list[jax.Device]) -> dict[str, Any]:
  cpu_model = None
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu_model = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  try:
    torch_version = __import__("torch").__version__
  except ImportError:
    torch_version = None
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "torch": torch_version,
      "platform": devices[0].platform,
      "device_kind": devices[0].device_kind,
      "devices_used": len(devices),
      "cpu_model": cpu_model,
      "cpu_count": os.cpu_count(),
      "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "commit": _git_commit(),
  }


def _git_commit() -> str | None:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=True,
                          cwd=pathlib.Path(__file__).parent).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=5,
                      help="measured epochs per variant, interleaved (default 5)")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma-separated, from {', '.join(VARIANTS)}")
  parser.add_argument("--devices", type=int, default=None,
                      help="use the first N jax devices (default: all)")
  parser.add_argument("--num-images", type=int, default=10_000,
                      help="train on the first N test images (default 10,000)")
  parser.add_argument("--matmul-size", type=int, default=4096,
                      help="side of the square float32 matmul (default 4096)")
  parser.add_argument("--matmul-repeats", type=int, default=10)
  parser.add_argument("--data-dir", type=pathlib.Path, default=None,
                      help="holds mnist/t10k-images-idx3-ubyte.gz (default: "
                      "$AVB_DATA_DIR, else ../shared/data)")
  parser.add_argument("--json", type=pathlib.Path, default=None)
  parser.add_argument("--results", type=pathlib.Path, default=None,
                      help="write the report as Markdown (benchmarks/RESULTS.md)")
  args = parser.parse_args(argv)
  args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [v for v in args.variants if v not in VARIANTS]
  if unknown or not args.variants:
    parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
  if args.rounds < 1:
    parser.error(f"--rounds={args.rounds} must be at least 1")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  all_devices = jax.devices()
  num_devices = args.devices or len(all_devices)
  if not 1 <= num_devices <= len(all_devices) or 100 % num_devices:
    sys.exit(f"--devices={num_devices}: jax sees {len(all_devices)} device(s), "
             "and 100 (the batch) must divide evenly over them")
  devices = all_devices[:num_devices]
  mesh = train.make_mesh(devices)
  data_dir = args.data_dir or data_lib.default_data_dir()
  try:
    images = data_lib.read_idx(data_dir / _IMAGES_FILE)[:args.num_images]
  except data_lib.DataError as e:
    sys.exit(f"{e} (set --data-dir or $AVB_DATA_DIR)")
  images = images.astype(np.float32) / np.float32(255.0)
  env = environment(devices)
  print(f"jax {env['jax']}, torch {env['torch']}, {num_devices} "
        f"{env['platform']} device(s), {env['cpu_count']} CPUs "
        f"({env['cpu_model']})", flush=True)

  trainers, notes, setup_seconds = {}, {}, {}
  for variant in args.variants:
    start = time.perf_counter()
    try:
      trainer = make_trainer(variant, images, mesh)
      trainer.run_epoch()  # compiles; warms caches, allocators, thread pools
    except ImportError as e:
      notes[variant] = f"skipped: {e}"
      continue
    except Exception as e:  # pylint: disable=broad-except
      if type(e).__name__ != "VariantUnavailable":
        raise
      notes[variant] = f"unavailable: {e}"
      continue
    trainers[variant] = trainer
    setup_seconds[variant] = time.perf_counter() - start
  for variant, note in notes.items():
    print(f"  {variant}: {note}")

  seconds = {v: [] for v in trainers}
  waits = {v: [] for v in trainers}
  for round_index in range(args.rounds):
    for variant, trainer in trainers.items():
      seconds[variant].append(trainer.run_epoch())
      waits[variant].append(trainer.last_wait)
    print(f"  round {round_index + 1}/{args.rounds}: " + ", ".join(
        f"{v} {trainers[v].examples_per_epoch / seconds[v][-1]:,.0f}"
        for v in trainers) + " examples/s", flush=True)
  final_elbo = {v: float(t.metrics["elbo"] if np.ndim(t.metrics["elbo"]) == 0
                         else np.mean(t.metrics["elbo"]))
                for v, t in trainers.items()}
  for trainer in trainers.values():
    trainer.close()

  matmul_rates = matmul_gflops(args.matmul_size, args.matmul_repeats)
  matmul_median = statistics.median(matmul_rates)
  model_config = models.ModelConfig.from_config(mnist_config.get_config().model,
                                                images.shape[1:])
  flops = matmul_flops_per_example(model_config, 1)

  rates = {v: [trainers[v].examples_per_epoch / s for s in seconds[v]]
           for v in trainers}
  ratios = {}

  def paired(name: str, numerator: str, denominator: str,
             fn: Callable[[float, float], float]) -> None:
    if numerator in rates and denominator in rates:
      values = [fn(a, b) for a, b in zip(seconds[numerator], seconds[denominator])]
      ratios[name] = {"per_round": values, **summarize(values)}

  # Throughput ratios: (examples/s of a) / (examples/s of b) per round.
  for other in ("torch_eager", "torch_compiled", "avb_streamed"):
    paired(f"avb / {other} (examples/s)", "avb", other,
           lambda a, b, o=other: (trainers["avb"].examples_per_epoch / a) /
           (trainers[o].examples_per_epoch / b))
  paired("avb_sweep8 time / avb time (8 runs vs 1)", "avb_sweep8", "avb",
         lambda a, b: a / b)

  report = {
      "environment": env,
      "settings": {"rounds": args.rounds, "num_images": int(len(images)),
                   "batch_size": 100, "steps_per_call": 100,
                   "devices": num_devices},
      "examples_per_sec": {v: {"per_round": r, **summarize(r)} for v, r in rates.items()},
      "setup_seconds": setup_seconds,
      "input_wait_fraction": {v: summarize(w) for v, w in waits.items()
                              if v == "avb_streamed"},
      "final_epoch_train_elbo": final_elbo,
      "ratios": ratios,
      "notes": notes,
      "flops_per_example": flops,
      "gflops_per_sec": {v: statistics.median(r) * flops["total"] / 1e9
                         for v, r in rates.items() if v != "avb_sweep8"},
      "matmul": {"size": args.matmul_size, "gflops_per_sec": matmul_rates,
                 **summarize(matmul_rates)},
      "peak_rss_mib": peak_rss_mib(),
      "device_peak_mib": device_peak_mib(devices[0]),
  }
  text = render(report, args)
  print()
  print(text)
  if args.json is not None:
    args.json.write_text(json.dumps(report, indent=2) + "\n")
  if args.results is not None:
    # Keep the hand-written analysis below the marker across reruns.
    kept = ""
    if args.results.exists():
      old = args.results.read_text()
      if _ANALYSIS_MARKER in old:
        kept = old[old.index(_ANALYSIS_MARKER):]
    args.results.write_text(
        "# Training throughput: avb against PyTorch and the machine\n\n"
        "Generated by `benchmarks/train_throughput.py` (rerun the command at "
        "the bottom of the tables to refresh them).\n\n" + text + "\n" + kept)
    print(f"Wrote {args.results}")
  return report


def render(report: dict[str, Any], args: argparse.Namespace) -> str:
  """The report as Markdown tables."""
  env, flops = report["environment"], report["flops_per_example"]
  matmul = report["matmul"]
  lines = [
      "| variant | examples/s median | min | max | GFLOP/s | fraction of matmul peak | final-epoch train ELBO |",
      "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for v, r in report["examples_per_sec"].items():
    gflops = report["gflops_per_sec"].get(v)
    fraction = "" if gflops is None else f"{gflops / matmul['median']:.0%}"
    gf = "" if gflops is None else f"{gflops:.1f}"
    lines.append(f"| {v} | {r['median']:,.0f} | {r['min']:,.0f} | {r['max']:,.0f} "
                 f"| {gf} | {fraction} | {report['final_epoch_train_elbo'][v]:.1f} |")
  lines += ["", "| paired ratio (per round) | median | min | max |",
            "|---|---:|---:|---:|"]
  for name, r in report["ratios"].items():
    lines.append(f"| {name} | {r['median']:.2f} | {r['min']:.2f} | {r['max']:.2f} |")
  lines += ["", "| target | measured (median) | met? |", "|---|---:|---|"]
  for name, key, threshold, direction in _TARGETS:
    if key == "matmul_fraction":
      gflops = report["gflops_per_sec"].get("avb")
      value = None if gflops is None else gflops / matmul["median"]
    elif key == "input_wait":
      wait = report["input_wait_fraction"].get("avb_streamed")
      value = None if wait is None else wait["median"]
    else:
      value = report["ratios"].get(key, {}).get("median")
    if value is None:
      lines.append(f"| {name} | not measured | |")
      continue
    met = {">=": value >= threshold, "<=": value <= threshold,
           "<": value < threshold}[direction]
    shown = f"{value:.1%}" if key in ("matmul_fraction", "input_wait") else f"{value:.2f}x"
    lines.append(f"| {name} | {shown} | {'yes' if met else 'no'} |")
  lines += ["", "| quantity | value |", "|---|---:|"]
  lines.append(f"| matmul FLOPs per example: forward / weight grads / input grads / total "
               f"| {flops['forward']:,} / {flops['weight_grads']:,} / "
               f"{flops['input_grads']:,} / {flops['total']:,} |")
  lines.append(f"| float32 matmul {matmul['size']}x{matmul['size']} GFLOP/s, median (min-max) "
               f"| {matmul['median']:.1f} ({matmul['min']:.1f}-{matmul['max']:.1f}) |")
  for v, w in report["input_wait_fraction"].items():
    lines.append(f"| input wait, {v} (fraction of epoch time, median / max) "
                 f"| {w['median']:.2%} / {w['max']:.2%} |")
  lines.append(f"| peak process RSS (all variants, MiB) | {report['peak_rss_mib']:,.0f} |")
  if report["device_peak_mib"] is not None:
    lines.append(f"| peak device memory (MiB) | {report['device_peak_mib']:,.0f} |")
  for v, s in report["setup_seconds"].items():
    lines.append(f"| set-up + compile + warm-up epoch, {v} (s) | {s:.1f} |")
  for v, note in report["notes"].items():
    lines.append(f"| {v} | {note} |")
  lines += ["", f"Machine: {env['cpu_model']}, {env['cpu_count']} CPUs, "
            f"{env['memory_gib']} GiB; {env['devices_used']} {env['platform']} "
            f"device(s) ({env['device_kind']}); jax {env['jax']}, torch "
            f"{env['torch']}, python {env['python']}; XLA_FLAGS="
            f"{env['xla_flags']!r}; commit {env['commit']}; {env['date']}.",
            f"Command: `python -m benchmarks.train_throughput "
            f"{' '.join(sys.argv[1:])}`",
            f"{report['settings']['rounds']} rounds; each sample is one epoch "
            f"of {report['settings']['num_images']:,} images in batches of 100 "
            "after a warm-up epoch; ratios are medians of per-round ratios."]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
