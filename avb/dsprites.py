"""dSprites (Matthey et al. 2017): factor grid, offline renderer, loaders.

dSprites holds 737,280 binary 64x64 images: every combination of six factors,
stored in a fixed order with the last factor varying fastest.

| index | factor      | classes | values (`LATENTS_POSSIBLE_VALUES`)           |
|------:|-------------|--------:|----------------------------------------------|
| 0     | color       | 1       | 1.0 (white)                                  |
| 1     | shape       | 3       | 1 square, 2 ellipse, 3 heart                 |
| 2     | scale       | 6       | linspace(0.5, 1, 6)                          |
| 3     | orientation | 40      | linspace(0, 2 pi, 40), both ends included    |
| 4     | posX        | 32      | linspace(0, 1, 32)                           |
| 5     | posY        | 32      | linspace(0, 1, 32)                           |

The official file `dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz` names its
arrays `imgs` (uint8 [N, 64, 64]), `latents_values` (float64 [N, 6]) and
`latents_classes` (int64 [N, 6]); `DSprites` keeps those names as attributes,
and the image index of a class vector is the mixed-radix number
`factors_to_index` computes.

Orientation. The official orientation values are linspace(0, 2 pi, 40) *with*
both end points: the metadata lists 0, 0.16110732, ..., 6.28318531, and
0.16110732 = 2 pi / 39 (public copies of `latents_possible_values` show these
numbers). Orientation classes 0 and 39 are therefore the same angle and give
the same image, a known quirk of the dataset (github.com/deepmind/
dsprites-dataset issue #7, "Duplicated factor values"). This module keeps the
official values, quirk included, so its classes and values match the file.

Rendering, where the official file is absent. The dataset's author explained
(dsprites-dataset issue #2) that the sprites were vector shapes drawn with
Love2D on a canvas of normalized size 1 (square: `love.graphics.rectangle`,
ellipse: `love.graphics.ellipse`, heart: a procedurally generated mesh) and
rasterized to 64x64 binary pixels without anti-aliasing, hence the jagged
edges of rotated shapes (issue #3). The exact sizes, the mapping from posX /
posY to pixels and the heart's outline are not published, so `render_images`
makes documented choices instead:

* A pixel is on when its centre lies inside the shape (`supersample=1`, the
  rule of a rasterizer without anti-aliasing, as the original); with
  `supersample=k` it is on when at least half of k x k sub-samples are inside.
* Position: the sprite's centre is at the centre of pixel 16 + class, i.e. at
  16.5 + 31 * pos in pixel-edge coordinates, for both axes. That spans 31
  pixels in steps of exactly one pixel, which fits the dataset's description
  ("the smallest step changes while ensuring that all pixel outputs were
  different") and makes every position a whole-pixel shift of one template,
  which is what makes rendering the full set fast. posX moves the sprite right
  (column), posY moves it down (row). The InfiniteDSprites re-implementation
  (github.com/sbdzdz/disco) chose a nearly identical range, centres at 16 to
  48 of 64.
* Size: at scale 1 each shape's bounding box at orientation 0 is
  `SPRITE_SIZE_PX` = 21 pixels wide: the square's side (21 x 21 = 441 pixels
  on), the ellipse's major axis (minor axis half of it), the heart's width.
  Calibrated so that the mean pixel of the rendered set, 0.0426 (174 pixels
  on), matches the mean 0.043 (std 0.202) that public normalisation constants
  quote for the official images. Half-sizes are never whole numbers at any
  scale, so no edge passes exactly through a pixel centre.
* Shapes, in a frame with y pointing down: the square is axis aligned at
  orientation 0; the ellipse's major axis is horizontal; the heart is upright
  (two lobes at the top, point at the bottom), built as a 45-degree-rotated
  square with a disc on each upper edge, and centred on its bounding box.
* Orientation rotates the shape about its centre, clockwise on screen for a
  growing angle (the y-down convention of Love2D). Angles are reduced modulo
  2 pi first, so classes 0 and 39 render identically, as in the official file.

Known differences from the official file: the rendered images are not pixel
identical to it. The sprite size, the position offset and step, the ellipse's
aspect ratio, the heart's outline, each shape's pose at orientation 0 and the
sense of rotation are estimates (the mean-pixel calibration rests on a
third-party constant, not on the file), so orientation class k may show a
different pose than the official image of class k. Numbers measured on
rendered data are comparable with each other, not with published dSprites
numbers; use the official npz (source "npz" or "tfds") for those.

Sources, tried in this order by `load_dsprites(source="auto")`:
1. "npz": the official file under `data_dir/dsprites/` (default `$AVB_DATA_DIR`,
   else `<repo>/../shared/data`).
2. "tfds": TFDS `dsprites`, only when already prepared locally (never
   downloaded; `tensorflow_datasets` is imported only then).
3. "render": rendered once into a .npy memmap under `cache_dir` (default
   `$AVB_CACHE_DIR`, else `~/.cache/avb/dsprites`), reused afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import math
import os
import pathlib
import tempfile
import zipfile
from typing import Sequence

from absl import logging
import numpy as np

from avb import data as data_lib


class DSpritesError(ValueError):
  """Bad or missing dSprites data; the message is one line: what, where, fix."""


# ----------------------------------------------------------------------------
# The factor grid.

FACTOR_NAMES = ("color", "shape", "scale", "orientation", "posX", "posY")
SHAPE_NAMES = ("square", "ellipse", "heart")
NUM_FACTORS = len(FACTOR_NAMES)
IMAGE_SIZE = 64
NUM_IMAGES = 737_280
NPZ_FILENAME = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
SOURCES = ("auto", "npz", "tfds", "render")


def _read_only(array: np.ndarray) -> np.ndarray:
  array.setflags(write=False)
  return array


# Named as in the official metadata (`latents_sizes`).
LATENTS_SIZES = _read_only(np.array([1, 3, 6, 40, 32, 32], dtype=np.int64))
# bases[i] = prod(sizes[i + 1:]): the weight of factor i in the image index.
LATENTS_BASES = _read_only(
    np.concatenate([np.cumprod(LATENTS_SIZES[::-1])[::-1][1:], [1]]))
LATENTS_POSSIBLE_VALUES = {
    "color": _read_only(np.array([1.0])),
    "shape": _read_only(np.array([1.0, 2.0, 3.0])),
    "scale": _read_only(np.linspace(0.5, 1.0, 6)),
    "orientation": _read_only(np.linspace(0.0, 2.0 * np.pi, 40)),
    "posX": _read_only(np.linspace(0.0, 1.0, 32)),
    "posY": _read_only(np.linspace(0.0, 1.0, 32)),
}
FACTOR_SIZES = tuple(int(s) for s in LATENTS_SIZES)
assert math.prod(FACTOR_SIZES) == NUM_IMAGES

# The grid of the whole dataset: one list of class indices per factor. Tests
# may point this at a smaller grid to exercise the render cache quickly.
FULL_GRID: tuple[tuple[int, ...], ...] = tuple(
    tuple(range(size)) for size in LATENTS_SIZES)


def _as_classes(classes: object, what: str = "classes") -> np.ndarray:
  """Validates factor classes [..., 6] and returns them as int64."""
  array = np.asarray(classes)
  if array.ndim < 1 or array.shape[-1] != NUM_FACTORS:
    raise DSpritesError(
        f"{what} must have shape [..., {NUM_FACTORS}] (one class per factor "
        f"{', '.join(FACTOR_NAMES)}), got shape {array.shape}")
  if array.size and not np.issubdtype(array.dtype, np.integer):
    if not np.all(np.equal(np.mod(array, 1), 0)):
      raise DSpritesError(
          f"{what} must be integer class indices, got dtype {array.dtype} "
          "with fractional entries; convert factor values with the index of "
          "LATENTS_POSSIBLE_VALUES")
  array = array.astype(np.int64, copy=False)
  if array.size and (np.any(array < 0) or np.any(array >= LATENTS_SIZES)):
    bad = np.argwhere((array < 0) | (array >= LATENTS_SIZES))[0]
    factor = int(bad[-1])
    raise DSpritesError(
        f"{what} has {FACTOR_NAMES[factor]} class {int(array[tuple(bad)])} "
        f"outside [0, {int(LATENTS_SIZES[factor]) - 1}]")
  return array


def factors_to_index(classes: object) -> np.ndarray:
  """Image index of factor classes: sum_i classes[..., i] * prod(sizes[i+1:]).

  Args:
    classes: int [..., 6] factor classes in the official order.

  Returns:
    int64 [...], indices into the official `imgs` array.
  """
  return _as_classes(classes) @ LATENTS_BASES


def index_to_factors(index: object) -> np.ndarray:
  """Factor classes of image indices, the inverse of `factors_to_index`.

  Args:
    index: int [...] indices in [0, 737280).

  Returns:
    int64 [..., 6] factor classes.
  """
  index = np.asarray(index)
  if index.size and not np.issubdtype(index.dtype, np.integer):
    raise DSpritesError(f"image indices must be integers, got {index.dtype}")
  index = index.astype(np.int64, copy=False)
  if index.size and (index.min() < 0 or index.max() >= NUM_IMAGES):
    raise DSpritesError(
        f"image index out of range [0, {NUM_IMAGES}): got values in "
        f"[{index.min()}, {index.max()}]")
  return np.stack(np.unravel_index(index, LATENTS_SIZES), axis=-1).astype(
      np.int64)


def classes_to_values(classes: object) -> np.ndarray:
  """Factor values (as in `latents_values`) of factor classes.

  Args:
    classes: int [..., 6] factor classes.

  Returns:
    float64 [..., 6] factor values.
  """
  classes = _as_classes(classes)
  columns = [LATENTS_POSSIBLE_VALUES[name][classes[..., i]]
             for i, name in enumerate(FACTOR_NAMES)]
  return np.stack(columns, axis=-1).astype(np.float64)


def latents_classes() -> np.ndarray:
  """The official `latents_classes`: int64 [737280, 6], row i = factors of i."""
  return index_to_factors(np.arange(NUM_IMAGES))


def latents_values() -> np.ndarray:
  """The official `latents_values`: float64 [737280, 6]."""
  return classes_to_values(latents_classes())


def grid_classes(grid: Sequence[Sequence[int]]) -> np.ndarray:
  """Factor classes of the product of `grid`, in the official order.

  Args:
    grid: one sequence of class indices per factor.

  Returns:
    int64 [prod(len(g) for g in grid), 6], the last factor varying fastest.
  """
  grid = _check_grid(grid)
  mesh = np.meshgrid(*[np.asarray(g, np.int64) for g in grid], indexing="ij")
  return np.stack([m.reshape(-1) for m in mesh], axis=-1)


def _check_grid(grid: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
  if len(grid) != NUM_FACTORS:
    raise DSpritesError(
        f"a grid needs one list of classes per factor ({NUM_FACTORS}), got "
        f"{len(grid)}")
  checked = []
  for i, classes in enumerate(grid):
    classes = tuple(int(c) for c in classes)
    if not classes or len(set(classes)) != len(classes) or min(classes) < 0 or (
        max(classes) >= LATENTS_SIZES[i]):
      raise DSpritesError(
          f"grid entry for {FACTOR_NAMES[i]} must list distinct classes in "
          f"[0, {int(LATENTS_SIZES[i]) - 1}], got {classes}")
    checked.append(classes)
  return tuple(checked)


# ----------------------------------------------------------------------------
# Sampling, for the disentanglement metrics.


def sample_factors(rng: np.random.Generator, n: int,
                   factor_sizes: Sequence[int] = FACTOR_SIZES
                   ) -> np.ndarray:
  """Draws n factor vectors uniformly from the grid.

  Args:
    rng: numpy Generator.
    n: number of vectors.
    factor_sizes: classes per factor (default: dSprites').

  Returns:
    int64 [n, len(factor_sizes)].
  """
  sizes = np.asarray(factor_sizes, np.int64)
  if n < 0:
    raise DSpritesError(f"cannot sample n={n} factor vectors; n must be >= 0")
  return rng.integers(0, sizes, size=(n, sizes.size), dtype=np.int64)


def sample_with_fixed_factor(rng: np.random.Generator, n: int,
                             factor_index: int, value: int | None = None,
                             factor_sizes: Sequence[int] = FACTOR_SIZES
                             ) -> np.ndarray:
  """Draws n factor vectors that all share one factor's class.

  Args:
    rng: numpy Generator.
    n: number of vectors.
    factor_index: which factor is fixed.
    value: its class; None draws one uniformly (shared by all n).
    factor_sizes: classes per factor (default: dSprites').

  Returns:
    int64 [n, len(factor_sizes)], column `factor_index` constant.
  """
  sizes = np.asarray(factor_sizes, np.int64)
  if not 0 <= factor_index < sizes.size:
    raise DSpritesError(
        f"factor_index={factor_index} outside [0, {sizes.size - 1}]")
  if value is None:
    value = int(rng.integers(sizes[factor_index]))
  elif not 0 <= value < sizes[factor_index]:
    raise DSpritesError(
        f"value={value} outside [0, {int(sizes[factor_index]) - 1}] for factor "
        f"{factor_index}")
  classes = sample_factors(rng, n, sizes)
  classes[:, factor_index] = value
  return classes


# ----------------------------------------------------------------------------
# The renderer.

# Geometry (see the module docstring). Changing any of these changes the cache
# key, so a stale cache is never reused.
RENDERER_VERSION = 1
POSITION_FIRST_PIXEL = 16     # pixel whose centre holds the sprite at pos 0
SPRITE_SIZE_PX = 21.0         # bounding-box width at scale 1, orientation 0
ELLIPSE_ASPECT = 0.5          # minor / major axis
# Templates are drawn in a window of this many pixels with the sprite centred
# on pixel POSITION_FIRST_PIXEL; the largest shift is 31 pixels.
_MAX_SHIFT = int(LATENTS_SIZES[4]) - 1
_WINDOW = IMAGE_SIZE - _MAX_SHIFT
# Padded templates: the image for shift (x, y) is the 64x64 window of a padded
# template starting at (_MAX_SHIFT - y, _MAX_SHIFT - x).
_PADDED = IMAGE_SIZE + _MAX_SHIFT
_RENDER_CHUNK = 1024  # images per gather in `render_images`


def _inside(shape: int, u: np.ndarray, v: np.ndarray,
            size: np.ndarray) -> np.ndarray:
  """Whether shape-frame points (u right, v down) lie inside the shape.

  Args:
    shape: class 0 square, 1 ellipse, 2 heart.
    u, v: coordinates in pixels relative to the sprite centre; broadcast with
      `size`.
    size: bounding-box width in pixels (scale * SPRITE_SIZE_PX).
  """
  half = size / 2.0
  if shape == 0:
    return np.maximum(np.abs(u), np.abs(v)) <= half
  if shape == 1:
    minor = half * ELLIPSE_ASPECT
    return (u / half) ** 2 + (v / minor) ** 2 <= 1.0
  # Heart: a square of diagonal 2d turned 45 degrees (a diamond), plus a disc
  # of radius d / sqrt(2) on the midpoint of each upper edge. Its width is
  # d (1 + sqrt 2); its height runs from d below the diamond's centre to
  # d (1/2 + 1/sqrt 2) above, so the centre of the bounding box is `lift`
  # above the diamond's centre.
  d = size / (1.0 + math.sqrt(2.0))
  radius = d / math.sqrt(2.0)
  lift = d * (0.5 + 1.0 / math.sqrt(2.0) - 1.0) / 2.0
  up = -v + lift  # height above the diamond's centre
  diamond = np.abs(u) + np.abs(up) <= d
  left = (u + d / 2) ** 2 + (up - d / 2) ** 2 <= radius ** 2
  right = (u - d / 2) ** 2 + (up - d / 2) ** 2 <= radius ** 2
  return diamond | left | right


@functools.lru_cache(maxsize=4)
def _templates(supersample: int) -> np.ndarray:
  """All 720 sprites at position (0, 0), padded for shifting.

  Returns:
    uint8 [3, 6, 40, _PADDED, _PADDED]: `padded[s, c, o, r + 31, q + 31]` is
    pixel (row r, column q) of the image with posX = posY = class 0.
  """
  k = supersample
  offsets = (np.arange(k) + 0.5) / k
  # Sample points of the window, relative to the centre of the sprite, which
  # is the centre of pixel POSITION_FIRST_PIXEL in both axes.
  axis = (np.arange(_WINDOW)[:, None] + offsets[None, :]).reshape(-1)
  axis = axis - (POSITION_FIRST_PIXEL + 0.5)
  y, x = np.meshgrid(axis, axis, indexing="ij")  # [W*k, W*k]
  angles = np.mod(LATENTS_POSSIBLE_VALUES["orientation"], 2.0 * np.pi)
  cos = np.cos(angles)[:, None, None]
  sin = np.sin(angles)[:, None, None]
  # The shape is rotated by +angle (clockwise on a y-down screen), so a pixel
  # is inside when its inverse rotation lies inside the unrotated shape.
  u = cos * x + sin * y  # [40, W*k, W*k]
  v = -sin * x + cos * y
  sizes = LATENTS_POSSIBLE_VALUES["scale"] * SPRITE_SIZE_PX
  padded = np.zeros((3, 6, 40, _PADDED, _PADDED), np.uint8)
  for shape in range(3):
    for scale, size in enumerate(sizes):
      inside = _inside(shape, u, v, np.float64(size))
      coverage = inside.reshape(40, _WINDOW, k, _WINDOW, k).mean(axis=(2, 4))
      window = (coverage >= 0.5).astype(np.uint8)
      if window[:, [0, -1], :].any() or window[:, :, [0, -1]].any():
        raise RuntimeError(
            f"{SHAPE_NAMES[shape]} at scale class {scale} touches the edge of "
            f"its {_WINDOW}-pixel template; SPRITE_SIZE_PX={SPRITE_SIZE_PX} "
            f"or POSITION_FIRST_PIXEL={POSITION_FIRST_PIXEL} is too large")
      padded[shape, scale, :, _MAX_SHIFT:_MAX_SHIFT + _WINDOW,
             _MAX_SHIFT:_MAX_SHIFT + _WINDOW] = window
  padded.setflags(write=False)
  return padded


def _check_supersample(supersample: int) -> int:
  if isinstance(supersample, bool) or not isinstance(
      supersample, (int, np.integer)) or supersample < 1:
    raise DSpritesError(
        f"supersample={supersample!r} must be an int >= 1 (1 = pixel-centre "
        "sampling, as the original rasterizer)")
  return int(supersample)


def render_images(classes: object, *, supersample: int = 1) -> np.ndarray:
  """Renders the images of arbitrary factor combinations.

  Deterministic: the same classes always give the same pixels.

  Args:
    classes: int [n, 6] factor classes.
    supersample: k for k x k samples per pixel (1: pixel centres only).

  Returns:
    uint8 [n, 64, 64] with values 0 and 1.
  """
  classes = _as_classes(classes)
  if classes.ndim != 2:
    raise DSpritesError(
        f"classes must have shape [n, {NUM_FACTORS}], got {classes.shape}")
  padded = _templates(_check_supersample(supersample))
  flat = padded.reshape(-1)
  template = (classes[:, 1] * 6 + classes[:, 2]) * 40 + classes[:, 3]
  pixels = np.arange(IMAGE_SIZE)
  out = np.empty((classes.shape[0], IMAGE_SIZE, IMAGE_SIZE), np.uint8)
  for start in range(0, classes.shape[0], _RENDER_CHUNK):
    part = slice(start, start + _RENDER_CHUNK)
    first_row = _MAX_SHIFT - classes[part, 5]
    first_col = _MAX_SHIFT - classes[part, 4]
    index = (template[part, None, None] * _PADDED * _PADDED
             + (first_row[:, None, None] + pixels[None, :, None]) * _PADDED
             + first_col[:, None, None] + pixels[None, None, :])
    out[part] = flat[index]
  return out


def render_grid(grid: Sequence[Sequence[int]] | None = None, *,
                out: np.ndarray | None = None,
                supersample: int = 1) -> np.ndarray:
  """Renders the product of a factor grid in the official order.

  Each (shape, scale, orientation) sprite is drawn once; its positions are
  whole-pixel shifts of it, taken as windows of one padded template.

  Args:
    grid: one sequence of classes per factor; None for the whole dataset.
    out: optional uint8 [N, 64, 64] array (e.g. a memmap) to fill.
    supersample: as in `render_images`.

  Returns:
    `out`, or a new uint8 [N, 64, 64] array, N = prod(len(g) for g in grid).
  """
  grid = _check_grid(FULL_GRID if grid is None else grid)
  padded = _templates(_check_supersample(supersample))
  num = math.prod(len(g) for g in grid)
  shape = (num, IMAGE_SIZE, IMAGE_SIZE)
  if out is None:
    out = np.empty(shape, np.uint8)
  elif out.shape != shape or out.dtype != np.uint8:
    raise DSpritesError(
        f"out must be uint8 {shape} for this grid, got {out.dtype} {out.shape}")
  xs, ys = np.asarray(grid[4]), np.asarray(grid[5])
  per_sprite = xs.size * ys.size
  block_shape = (xs.size, ys.size, IMAGE_SIZE, IMAGE_SIZE)
  sprites = itertools.product(grid[0], grid[1], grid[2], grid[3])
  for i, (_, shape_class, scale, orientation) in enumerate(sprites):
    windows = np.lib.stride_tricks.sliding_window_view(
        padded[shape_class, scale, orientation], (IMAGE_SIZE, IMAGE_SIZE))
    # windows[a, b] starts at row a, column b; shift (x, y) starts at
    # (31 - y, 31 - x). Rows of `out` run over x, then y (posY fastest).
    block = out[i * per_sprite:(i + 1) * per_sprite].reshape(block_shape)
    block[...] = windows[(_MAX_SHIFT - ys)[None, :], (_MAX_SHIFT - xs)[:, None]]
  return out


# ----------------------------------------------------------------------------
# The dataset container.


@dataclasses.dataclass(frozen=True)
class DSprites:
  """dSprites images with their factors.

  Attributes:
    images: uint8 [N, 64, 64] of 0 and 1 (may be a read-only np.memmap).
    latents_classes: int64 [N, 6].
    latents_values: float64 [N, 6].
    source: provenance, e.g. "npz:/abs/path" or "render:/abs/cache.npy".
  """

  images: np.ndarray
  latents_classes: np.ndarray
  latents_values: np.ndarray
  source: str

  def __post_init__(self):
    num = self.images.shape[0]
    if self.images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or (
        self.latents_classes.shape != (num, NUM_FACTORS)) or (
            self.latents_values.shape != (num, NUM_FACTORS)):
      raise DSpritesError(
          f"dSprites from {self.source}: images {self.images.shape}, classes "
          f"{self.latents_classes.shape} and values "
          f"{self.latents_values.shape} do not match [N, 64, 64], [N, 6]")

  @property
  def imgs(self) -> np.ndarray:
    """The images, under the official npz name."""
    return self.images

  @property
  def factor_names(self) -> tuple[str, ...]:
    return FACTOR_NAMES

  @property
  def factor_sizes(self) -> tuple[int, ...]:
    return FACTOR_SIZES

  @property
  def latents_sizes(self) -> np.ndarray:
    return LATENTS_SIZES

  @property
  def num_images(self) -> int:
    return int(self.images.shape[0])

  @property
  def is_complete(self) -> bool:
    """True when images[i] is the image of index i for the whole grid."""
    return self.num_images == NUM_IMAGES

  def images_for(self, classes: object) -> np.ndarray:
    """Images of factor classes [n, 6]: read by index, or rendered.

    A complete set is read by `factors_to_index` (in sorted index order, which
    a memmap reads fastest); a partial set cannot hold every combination, so
    the images are rendered.
    """
    classes = _as_classes(classes)
    if not self.is_complete:
      return render_images(classes)
    index = factors_to_index(classes)
    order = np.argsort(index, kind="stable")
    out = np.empty((index.size, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    out[order] = self.images[index[order]]
    return out

  def describe(self) -> str:
    return f"dSprites: {self.num_images} images from {self.source}"


def images_for(classes: object, dataset: DSprites | None = None) -> np.ndarray:
  """Images of factor classes [n, 6], from `dataset` or else rendered."""
  if dataset is None:
    return render_images(classes)
  return dataset.images_for(classes)


# ----------------------------------------------------------------------------
# Sources.


def default_cache_dir() -> pathlib.Path:
  """$AVB_CACHE_DIR, else ~/.cache/avb/dsprites."""
  from_env = os.environ.get("AVB_CACHE_DIR")
  if from_env:
    return pathlib.Path(from_env)
  return pathlib.Path.home() / ".cache" / "avb" / "dsprites"


def _geometry_key(supersample: int) -> str:
  text = repr((RENDERER_VERSION, POSITION_FIRST_PIXEL, SPRITE_SIZE_PX,
               ELLIPSE_ASPECT, supersample))
  return hashlib.sha1(text.encode()).hexdigest()[:10]


def cache_path(cache_dir: str | os.PathLike[str] | None = None,
               grid: Sequence[Sequence[int]] | None = None, *,
               supersample: int = 1) -> pathlib.Path:
  """Where `render_to_cache` keeps the images of `grid`."""
  grid = _check_grid(FULL_GRID if grid is None else grid)
  directory = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
  if grid == FULL_GRID:
    name = "full"
  else:
    name = "grid-" + hashlib.sha1(repr(grid).encode()).hexdigest()[:10]
  key = _geometry_key(_check_supersample(supersample))
  return directory / f"dsprites_render_{key}_{name}.npy"


def render_to_cache(cache_dir: str | os.PathLike[str] | None = None,
                    grid: Sequence[Sequence[int]] | None = None, *,
                    supersample: int = 1) -> DSprites:
  """Renders a grid once into a .npy file and maps it; later calls reuse it.

  The file is written under a temporary name in the same directory and renamed
  into place, so an interrupted render never leaves a truncated cache behind.

  Args:
    cache_dir: directory of the cache; None means `default_cache_dir()`.
    grid: factor grid; None for the whole dataset (3 GB of uint8).
    supersample: as in `render_images`.

  Returns:
    `DSprites` whose images are a read-only np.memmap of the cache file.
  """
  grid = _check_grid(FULL_GRID if grid is None else grid)
  path = cache_path(cache_dir, grid, supersample=supersample)
  classes = grid_classes(grid)
  shape = (classes.shape[0], IMAGE_SIZE, IMAGE_SIZE)
  images = None
  if path.is_file():
    try:
      images = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
      logging.warning("Ignoring unreadable dSprites cache %s (%s)", path, e)
    if images is not None and (images.shape != shape or
                               images.dtype != np.uint8):
      logging.warning("Ignoring dSprites cache %s of %s %s, expected uint8 %s",
                      path, images.dtype, images.shape, shape)
      images = None
  if images is None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(
        dir=path.parent, prefix=path.stem + ".", suffix=".part")
    os.close(handle)
    try:
      out = np.lib.format.open_memmap(
          partial, mode="w+", dtype=np.uint8, shape=shape)
      render_grid(grid, out=out, supersample=supersample)
      out.flush()
      del out
      os.replace(partial, path)
    except BaseException:
      pathlib.Path(partial).unlink(missing_ok=True)
      raise
    logging.info("Rendered %d dSprites images into %s", shape[0], path)
    images = np.load(path, mmap_mode="r")
  return DSprites(images=images, latents_classes=classes,
                  latents_values=classes_to_values(classes),
                  source=f"render:{path.resolve()}")


def _npz_headers(path: pathlib.Path) -> dict[str, tuple[tuple[int, ...],
                                                        np.dtype]]:
  """Shape and dtype of each array in an npz, without decompressing any."""
  headers = {}
  with zipfile.ZipFile(path) as archive:
    for member in archive.namelist():
      if not member.endswith(".npy"):
        continue
      with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
          shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
          shape, _, dtype = np.lib.format.read_array_header_2_0(f)
      headers[member[:-len(".npy")]] = (tuple(shape), dtype)
  return headers


_NPZ_EXPECTED = {
    "imgs": (NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE),
    "latents_values": (NUM_IMAGES, NUM_FACTORS),
    "latents_classes": (NUM_IMAGES, NUM_FACTORS),
}


_NPZ_FIX = (f"replace it with the official {NPZ_FILENAME} from "
            "github.com/deepmind/dsprites-dataset, or use source='render'")


def find_npz(data_dir: str | os.PathLike[str] | None = None
             ) -> pathlib.Path | None:
  """The official npz under data_dir/dsprites/ (or data_dir/), if present."""
  directory = pathlib.Path(data_dir) if data_dir else (
      data_lib.default_data_dir())
  for candidate in (directory / "dsprites" / NPZ_FILENAME,
                    directory / NPZ_FILENAME):
    if candidate.is_file():
      return candidate
  return None


def load_npz(path: str | os.PathLike[str]) -> DSprites:
  """Loads and validates the official dSprites npz (3 GB once decompressed).

  Raises:
    DSpritesError: when the file is not a readable npz, lacks one of `imgs`,
      `latents_values`, `latents_classes`, or holds wrong shapes, pixel values
      or factor order.
  """
  path = pathlib.Path(path)
  try:
    headers = _npz_headers(path)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise DSpritesError(
        f"{path} is not a readable npz ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); {_NPZ_FIX}"
    ) from e
  missing = sorted(set(_NPZ_EXPECTED) - set(headers))
  if missing:
    raise DSpritesError(
        f"{path} lacks array(s) {', '.join(missing)} (it has "
        f"{', '.join(sorted(headers)) or 'none'}); {_NPZ_FIX}")
  for name, expected in _NPZ_EXPECTED.items():
    shape, dtype = headers[name]
    if shape != expected:
      raise DSpritesError(
          f"{path}: array {name} has shape {shape}, expected {expected}; "
          f"{_NPZ_FIX}")
    if dtype.kind not in ("u", "i", "b", "f"):
      raise DSpritesError(
          f"{path}: array {name} has dtype {dtype}, expected numbers; "
          f"{_NPZ_FIX}")
  with np.load(path, allow_pickle=False) as npz:
    classes = np.asarray(npz["latents_classes"]).astype(np.int64)
    if not np.array_equal(classes, latents_classes()):
      raise DSpritesError(
          f"{path}: latents_classes are not the official grid in the official "
          f"order (last factor fastest); {_NPZ_FIX}")
    values = np.asarray(npz["latents_values"], np.float64)
    images = np.asarray(npz["imgs"])
  if images.dtype == np.bool_:
    images = images.view(np.uint8)
  if images.dtype != np.uint8 or images.max() > 1:
    raise DSpritesError(
        f"{path}: imgs must be uint8 zeros and ones, got {images.dtype} with "
        f"maximum {images.max()}; {_NPZ_FIX}")
  return DSprites(images=images, latents_classes=classes,
                  latents_values=values, source=f"npz:{path.resolve()}")


def tfds_is_prepared(tfds_data_dir: str | None = None) -> bool:
  """Whether TFDS dsprites is prepared locally; never downloads anything."""
  return data_lib.tfds_is_prepared("dsprites", tfds_data_dir)


def load_tfds(tfds_data_dir: str | None = None) -> DSprites:
  """Loads a locally prepared TFDS dsprites, reordered to the official order.

  TFDS stores examples in its own shuffled order, so images are put back at
  `factors_to_index` of their labels.
  """
  where = tfds_data_dir or "the default TFDS data dir"
  if not data_lib.tfds_installed():
    raise DSpritesError(
        "source='tfds' needs tensorflow-datasets, which the base install "
        f"leaves out; install the extra with {data_lib.TFDS_INSTALL_HINT}, or "
        "use source='render'")
  if not tfds_is_prepared(tfds_data_dir):
    raise DSpritesError(
        f"TFDS dsprites is not prepared in {where}; run `tfds build dsprites` "
        "on an online machine and copy it there, or use source='render'")
  try:
    import tensorflow_datasets as tfds  # Lazy: keeps this module light.

    dataset = tfds.load("dsprites", split="train", data_dir=tfds_data_dir,
                        download=False, batch_size=16_384)
    images = np.zeros((NUM_IMAGES, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    seen = np.zeros(NUM_IMAGES, np.int64)
    names = ("label_shape", "label_scale", "label_orientation",
             "label_x_position", "label_y_position")
    for batch in tfds.as_numpy(dataset):
      labels = [np.zeros_like(batch[names[0]])] + [batch[n] for n in names]
      index = factors_to_index(np.stack(labels, axis=-1))
      images[index] = batch["image"][..., 0]
      np.add.at(seen, index, 1)
  except DSpritesError:
    raise
  except Exception as e:  # TFDS and TF raise many types; report them alike.
    raise DSpritesError(
        f"TFDS dsprites failed to load from {where} ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); fix or delete that "
        "TFDS directory, or use source='render'") from e
  if not np.all(seen == 1):
    raise DSpritesError(
        f"TFDS dsprites in {where} holds {int(seen.sum())} examples covering "
        f"{int((seen > 0).sum())} of {NUM_IMAGES} factor combinations; "
        "re-prepare it")
  if images.max() > 1:  # Tolerate a copy stored as 0/255.
    images = (images >= 128).astype(np.uint8)
  return DSprites(images=images, latents_classes=latents_classes(),
                  latents_values=latents_values(),
                  source=f"tfds:dsprites ({where})")


def load_dsprites(source: str = "auto",
                  data_dir: str | os.PathLike[str] | None = None,
                  cache_dir: str | os.PathLike[str] | None = None,
                  tfds_data_dir: str | None = None) -> DSprites:
  """Loads dSprites from the best source available, offline.

  Args:
    source: "npz", "tfds", "render", or "auto" (npz, then a prepared TFDS,
      then render).
    data_dir: where to look for dsprites/<official npz>; None means
      `$AVB_DATA_DIR`, else <repo>/../shared/data.
    cache_dir: where "render" keeps its .npy; None means `default_cache_dir()`.
    tfds_data_dir: TFDS data directory; None means TFDS's default.

  Returns:
    A `DSprites` whose `source` says where the images came from.

  Raises:
    DSpritesError: on an unknown source, or a missing or bad npz / TFDS copy
      asked for by name (an existing but bad npz also stops "auto").
  """
  if source not in SOURCES:
    raise DSpritesError(
        f"Unknown dSprites source {source!r}; choose one of "
        f"{', '.join(SOURCES)}")
  if source in ("auto", "npz"):
    path = find_npz(data_dir)
    if path is not None:
      dataset = load_npz(path)
      logging.info(dataset.describe())
      return dataset
    if source == "npz":
      directory = pathlib.Path(data_dir) if data_dir else (
          data_lib.default_data_dir())
      raise DSpritesError(
          f"{NPZ_FILENAME} not found in {directory / 'dsprites'}; download it "
          "from github.com/deepmind/dsprites-dataset into that directory (or "
          "set AVB_DATA_DIR), or use source='render'")
  if source == "tfds" or (source == "auto" and tfds_is_prepared(tfds_data_dir)):
    dataset = load_tfds(tfds_data_dir)
  else:
    dataset = render_to_cache(cache_dir)
  logging.info(dataset.describe())
  return dataset
