"""Image grids for reconstructions, samples and (later) manifolds and traversals."""

from __future__ import annotations

import pathlib

import numpy as np


def image_grid(images: np.ndarray, num_columns: int, padding: int = 1,
               pad_value: float = 1.0) -> np.ndarray:
  """Tiles images [N, H, W] into one [rows*(H+p)-p, cols*(W+p)-p] array.

  Missing cells of the last row are left at `pad_value`, so any N works.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 3:
    raise ValueError(f"image_grid expects [N, H, W] images, got shape {images.shape}")
  n, h, w = images.shape
  num_columns = max(1, min(num_columns, n))
  num_rows = -(-n // num_columns)
  grid = np.full((num_rows * (h + padding) - padding,
                  num_columns * (w + padding) - padding), pad_value, np.float32)
  for i, image in enumerate(images):
    r, c = divmod(i, num_columns)
    grid[r * (h + padding):r * (h + padding) + h,
         c * (w + padding):c * (w + padding) + w] = image
  return grid


def save_image(path: str | pathlib.Path, image: np.ndarray) -> None:
  """Saves a 2-D array in [0, 1] as a greyscale PNG (creating parent dirs)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  plt.imsave(path, np.clip(image, 0.0, 1.0), cmap="gray", vmin=0.0, vmax=1.0)
