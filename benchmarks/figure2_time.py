r"""How long the Frey Face Figure 2 `cpu` variant trains, against its target.

Issue 4 asks the `cpu` variant of Figure 2 for Frey Face (latent sizes 2, 5,
10, 20; AEVB and wake-sleep; 10^7 training examples evaluated per curve) to
finish within 30 minutes on a 2-core CPU. Running it whole takes over an hour
here, so this benchmark times every group of the figure (one method, one
latent size, all seeds in one compiled program) through the figure's own code
(`figures.run_figure`) on a shorter horizon, `--examples` per curve, and
projects each group to the variant's `figure.num_examples` from its measured
examples/s. The projection is a rate times a count: it leaves out the
figure's evaluation points (about a second each) and assumes the rate holds,
which it does once the program is compiled (compilation is inside the timed
span, so the projection errs long).

Rounds are interleaved (every group once per round) so that the machine's
drift hits all groups alike; the table gives medians and min-max over rounds.

Commands:
  python -m benchmarks.figure2_time --rounds=1 --examples=500000
  python -m benchmarks.figure2_time --num-seeds=1 --rounds=3
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time
from typing import Any, Sequence

from avb import figures
from experiments.configs import figure2_frey

TARGET_SECONDS = 30 * 60


def time_groups(examples: int, num_seeds: int, variant: str,
                workdir: pathlib.Path) -> dict[str, dict[str, float]]:
  """Trains every Figure 2 group for `examples` examples per curve.

  Returns:
    group name -> {"seconds": training seconds, "examples_per_sec": per seed}.
  """
  config = figure2_frey.get_config(f"{variant},num_seeds={num_seeds}")
  with config.unlocked():
    config.figure.num_examples = examples
    config.figure.first_eval_examples = examples
    config.figure.num_eval_points = 1
  figures.run_figure(config, workdir)
  timings = {}
  for path in sorted((workdir / "groups").glob("*/curves.json")):
    curves = json.loads(path.read_text())
    seconds = curves["train_seconds"]
    timings[curves["group"]] = {"seconds": seconds,
                                "examples_per_sec": examples / seconds}
  return timings


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--examples", type=int, default=500_000,
                      help="examples per curve actually trained")
  parser.add_argument("--num-seeds", type=int, default=2,
                      help="seeds per group (the cpu variant uses 2)")
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--variant", default="cpu", choices=("cpu", "smoke"))
  args = parser.parse_args(argv)

  full = figure2_frey.get_config(args.variant).figure.num_examples
  rounds: list[dict[str, dict[str, float]]] = []
  start = time.time()
  for _ in range(args.rounds):
    with tempfile.TemporaryDirectory() as tmp:
      rounds.append(time_groups(args.examples, args.num_seeds, args.variant,
                                pathlib.Path(tmp)))
  wall = time.time() - start

  rows, projected = [], 0.0
  for group in rounds[0]:
    rates = [r[group]["examples_per_sec"] for r in rounds]
    rate = statistics.median(rates)
    seconds = full / rate
    projected += seconds
    rows.append((group, rate, min(rates), max(rates), seconds))

  print(f"Frey Face Figure 2 `{args.variant}` variant, {args.num_seeds} "
        f"seed(s) per group, {args.examples:,} examples per curve timed, "
        f"{args.rounds} round(s), projected to {full:,} per curve\n")
  print("| group | examples/s per seed, median (min-max) | projected s |")
  print("| --- | --- | --- |")
  for group, rate, low, high, seconds in rows:
    print(f"| {group} | {rate:,.0f} ({low:,.0f}-{high:,.0f}) | "
          f"{seconds:,.0f} |")
  ratio = projected / TARGET_SECONDS
  print(f"\nprojected training time: {projected:,.0f} s = "
        f"{projected / 60:.1f} min; target {TARGET_SECONDS / 60:.0f} min; "
        f"projected / target = {ratio:.2f} "
        f"({'met' if ratio <= 1 else 'missed'})")
  print(f"benchmark wall time: {wall:.0f} s")
  return {"groups": {g: {"examples_per_sec": r, "projected_seconds": s}
                     for g, r, _, _, s in rows},
          "projected_seconds": projected, "target_seconds": TARGET_SECONDS,
          "ratio_to_target": ratio}


if __name__ == "__main__":
  main()
