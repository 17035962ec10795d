"""Where a run's numbers and pictures go: TensorBoard, metrics.jsonl, PNG files,
and one short console line per report.

Only process 0 writes files and console lines, so a multi-host run produces
one set of files and one console.

TensorBoard event files are written with `tensorboardX`, not with clu's
writers: `clu.metric_writers` imports TensorFlow at package import, and avb's
base install has no TensorFlow. tensorboardX writes scalars as classic
`simple_value` summaries, which TensorBoard's scalar dashboard and
`EventAccumulator(...).Tags()["scalars"]` list.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np

from avb import plotting

# The scalars a console line shows, in this order, when a record has them;
# everything else (KL per latent, norms, ...) goes to the files only.
_CONSOLE_METRICS = ("loss", "elbo", "kl", "capacity", "log_likelihood")
# Console lines stay short enough to read at a glance, with absl's prefix.
MAX_CONSOLE_CHARS = 140


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def format_duration(seconds: float) -> str:
  """'42s', '3m05s', '2h07m': a compact ETA."""
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(max(seconds, 0.0)))
  if seconds < 60:
    return f"{seconds}s"
  if seconds < 3600:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _format_count(value: float) -> str:
  if value >= 1e6:
    return f"{value / 1e6:.2f}M"
  if value >= 1e4:
    return f"{value / 1e3:.1f}k"
  return f"{value:.0f}"


def console_line(step: int, metrics: Mapping[str, Any], split: str, *,
                 num_steps: int | None = None, label: str | None = None) -> str:
  """One line for a person: step / total, examples/s, ETA and the main numbers.

  Args:
    step: the training step of the record.
    metrics: the record written to the files (any names; vectors are skipped).
    split: "train", "test", ...; names other than "train" prefix the numbers.
    num_steps: the run's total, shown as `step/total` and a percentage.
    label: the run's label in a sweep.

  Returns:
    At most MAX_CONSOLE_CHARS characters.
  """
  parts = []
  if label:
    parts.append(f"[{label}]")
  if num_steps:
    parts.append(f"step {step:,}/{num_steps:,} ({100 * step / num_steps:.0f}%)")
  else:
    parts.append(f"step {step:,}")
  if "examples_per_sec" in metrics:
    parts.append(f"{_format_count(float(metrics['examples_per_sec']))} ex/s")
  if "eta_seconds" in metrics and num_steps and step < num_steps:
    parts.append(f"ETA {format_duration(float(metrics['eta_seconds']))}")
  prefix = "" if split == "train" else f"{split} "
  for name in _CONSOLE_METRICS:
    value = metrics.get(name)
    if value is not None and np.ndim(value) == 0:
      parts.append(f"{prefix}{name} {float(value):.2f}")
  line = " | ".join(parts)
  return line if len(line) <= MAX_CONSOLE_CHARS else line[:MAX_CONSOLE_CHARS - 3] + "..."


class MetricLogger:
  """Writes scalar metrics, per-latent vectors and image grids of one run.

  TensorBoard event files go to `workdir`; every record is appended to
  `workdir/metrics.jsonl` as one JSON object per line, which is what scripts
  and the figure code read; images go to `workdir/images/NAME_STEP.png` and to
  TensorBoard. Each record also gets one console line (`console_line`), so
  the console shows progress, not every metric.
  """

  def __init__(self, workdir: str | pathlib.Path, *,
               num_steps: int | None = None, label: str | None = None):
    """Opens the run's files.

    Args:
      workdir: the run's directory (created by the caller).
      num_steps: the run's total steps, for `step/total` on the console.
      label: the run's label in a sweep, shown on its console lines.
    """
    self._workdir = pathlib.Path(workdir)
    self._is_writer = jax.process_index() == 0
    self._num_steps = num_steps
    self._label = label
    self._tb = None
    self._jsonl = None
    if self._is_writer:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(str(self._workdir), flush_secs=30)
      self._jsonl = open(self._workdir / "metrics.jsonl", "a")

  def write(self, step: int, metrics: Mapping[str, Any], split: str) -> None:
    """Writes one record: scalars to TensorBoard, everything to metrics.jsonl.

    Args:
      step: the training step the metrics belong to.
      metrics: name -> scalar or 1-D vector (e.g. kl_per_latent [J]); vectors
        become one TensorBoard scalar per entry.
      split: "train", "test", ... prefixed to the TensorBoard names.
    """
    if not self._is_writer:
      return
    logging.info("%s", console_line(step, metrics, split,
                                    num_steps=self._num_steps,
                                    label=self._label))
    for name, value in metrics.items():
      value = np.asarray(value)
      if value.ndim == 0:
        self._tb.add_scalar(f"{split}/{name}", float(value), int(step))
      else:
        for i, v in enumerate(value.reshape(-1)):
          self._tb.add_scalar(f"{split}/{name}/{i:03d}", float(v), int(step))
    record = {"step": int(step), "split": split}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()

  def write_images(self, step: int, name: str, images: np.ndarray,
                   num_columns: int) -> pathlib.Path | None:
    """Saves a grid of images [N, H, W] in [0, 1] as PNG and to TensorBoard."""
    if not self._is_writer:
      return None
    grid = plotting.image_grid(np.asarray(images), num_columns)
    self._tb.add_image(name, np.clip(grid, 0.0, 1.0)[None], int(step),
                       dataformats="CHW")
    path = self._workdir / "images" / f"{name}_{step:08d}.png"
    plotting.save_image(path, grid)
    return path

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None


def write_json(path: str | pathlib.Path, data: Mapping[str, Any]) -> None:
  """Writes `data` as indented JSON atomically (process 0 only)."""
  if jax.process_index() != 0:
    return
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
  tmp.replace(path)
