"""Where a run's numbers and pictures go: TensorBoard, metrics.jsonl, PNG files.

Only process 0 writes (the others log to the console), so a multi-host run
produces one set of files.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import jax
import numpy as np

from avb import plotting


def _to_python(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricLogger:
  """Writes scalar metrics, per-latent vectors and image grids of one run.

  TensorBoard event files go to `workdir` through clu's default writer (which
  also logs every scalar to the console); every record is appended to
  `workdir/metrics.jsonl` as one JSON object per line, which is what scripts
  and the figure code read; images go to `workdir/images/NAME_STEP.png` and to
  TensorBoard.
  """

  def __init__(self, workdir: str | pathlib.Path):
    # Imported here because clu pulls in TensorFlow, which is slow to import
    # and not needed by the library's math.
    from clu import metric_writers  # pylint: disable=g-import-not-at-top

    self._workdir = pathlib.Path(workdir)
    self._is_writer = jax.process_index() == 0
    self._writer = metric_writers.create_default_writer(
        str(self._workdir), just_logging=not self._is_writer)
    self._jsonl = None
    if self._is_writer:
      self._jsonl = open(self._workdir / "metrics.jsonl", "a")

  def write(self, step: int, metrics: Mapping[str, Any], split: str) -> None:
    """Writes one record: scalars to TensorBoard, everything to metrics.jsonl.

    Args:
      step: the training step the metrics belong to.
      metrics: name -> scalar or 1-D vector (e.g. kl_per_latent [J]); vectors
        become one TensorBoard scalar per entry.
      split: "train", "test", ... prefixed to the TensorBoard names.
    """
    scalars = {}
    for name, value in metrics.items():
      value = np.asarray(value)
      if value.ndim == 0:
        scalars[f"{split}/{name}"] = float(value)
      else:
        for i, v in enumerate(value.reshape(-1)):
          scalars[f"{split}/{name}/{i:03d}"] = float(v)
    self._writer.write_scalars(step, scalars)
    if self._jsonl is not None:
      record = {"step": int(step), "split": split}
      record.update({k: _to_python(v) for k, v in metrics.items()})
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()

  def write_images(self, step: int, name: str, images: np.ndarray,
                   num_columns: int) -> pathlib.Path | None:
    """Saves a grid of images [N, H, W] in [0, 1] as PNG and to TensorBoard."""
    grid = plotting.image_grid(np.asarray(images), num_columns)
    self._writer.write_images(step, {name: grid[None, :, :, None]})
    if not self._is_writer:
      return None
    path = self._workdir / "images" / f"{name}_{step:08d}.png"
    plotting.save_image(path, grid)
    return path

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()
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
