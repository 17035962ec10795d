"""Tests for avb/dsprites.py: the official grid, the renderer, the loaders.

The grid facts (sizes, order, values) come from the dataset's documentation
and its metadata (orientation step 0.16110732 = 2 pi / 39), an oracle
independent of the code. The renderer is checked by geometric properties that
any faithful dSprites renderer has. The full 737,280-image set is never
rendered here: cache tests use a small grid.
"""

import itertools
import math
import pathlib

import numpy as np
import pytest

from avb import dsprites

SIZES = (1, 3, 6, 40, 32, 32)


def _one_line(excinfo: pytest.ExceptionInfo, *needles: object) -> str:
  assert excinfo.type is dsprites.DSpritesError
  message = str(excinfo.value)
  assert "\n" not in message, message
  for needle in needles:
    assert str(needle) in message, f"{needle!r} not in {message!r}"
  return message


def _render_one(shape=0, scale=5, orientation=0, x=0, y=0):
  return dsprites.render_images(
      np.array([[0, shape, scale, orientation, x, y]]))[0]


def _centroid(image: np.ndarray) -> np.ndarray:
  rows, cols = np.nonzero(image)
  return np.array([rows.mean(), cols.mean()])


SMALL_GRID = ((0,), (0, 2), (1, 5), (0, 7, 39), (0, 30, 31), (2, 31))


# ----------------------------------------------------------------------------
# The factor grid.


def test_grid_sizes_and_order():
  assert tuple(dsprites.LATENTS_SIZES) == SIZES
  assert dsprites.NUM_IMAGES == math.prod(SIZES) == 737_280
  assert dsprites.FACTOR_NAMES == (
      "color", "shape", "scale", "orientation", "posX", "posY")
  classes = dsprites.latents_classes()
  assert classes.shape == (737_280, 6) and classes.dtype == np.int64
  # Last factor fastest: the first rows step posY, then posX.
  np.testing.assert_array_equal(classes[0], [0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(classes[1], [0, 0, 0, 0, 0, 1])
  np.testing.assert_array_equal(classes[32], [0, 0, 0, 0, 1, 0])
  np.testing.assert_array_equal(classes[1024], [0, 0, 0, 1, 0, 0])
  np.testing.assert_array_equal(classes[-1], np.array(SIZES) - 1)
  # Every combination exactly once, in C (row-major) order.
  np.testing.assert_array_equal(
      classes, np.indices(SIZES).reshape(6, -1).T)
  for row in (5, 777, 123_456, 700_001):
    product = itertools.islice(
        itertools.product(*[range(s) for s in SIZES]), row, None)
    assert tuple(classes[row]) == next(product)


def test_index_round_trip():
  np.testing.assert_array_equal(
      dsprites.LATENTS_BASES, [737_280, 245_760, 40_960, 1024, 32, 1])
  index = np.random.default_rng(1).integers(0, 737_280, size=(7, 11))
  classes = dsprites.index_to_factors(index)
  assert classes.shape == (7, 11, 6)
  np.testing.assert_array_equal(dsprites.factors_to_index(classes), index)
  np.testing.assert_array_equal(
      dsprites.factors_to_index(dsprites.latents_classes()),
      np.arange(737_280))
  assert dsprites.factors_to_index([0, 2, 5, 39, 31, 31]) == 737_279


def test_index_errors():
  with pytest.raises(dsprites.DSpritesError) as excinfo:
    dsprites.factors_to_index([0, 3, 0, 0, 0, 0])
  _one_line(excinfo, "shape", "[0, 2]")
  with pytest.raises(dsprites.DSpritesError) as excinfo:
    dsprites.factors_to_index([0, 1, 0])
  _one_line(excinfo, "[..., 6]")
  with pytest.raises(dsprites.DSpritesError) as excinfo:
    dsprites.index_to_factors([737_280])
  _one_line(excinfo, "737280")


def test_official_values():
  values = dsprites.LATENTS_POSSIBLE_VALUES
  np.testing.assert_array_equal(values["color"], [1.0])
  np.testing.assert_array_equal(values["shape"], [1.0, 2.0, 3.0])
  np.testing.assert_allclose(values["scale"], [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
  orientation = values["orientation"]
  assert orientation.size == 40
  # The metadata's second value and both end points included.
  np.testing.assert_allclose(orientation[1], 0.16110732, atol=1e-8)
  assert orientation[0] == 0.0 and orientation[-1] == 2 * np.pi
  np.testing.assert_allclose(values["posX"], np.arange(32) / 31)
  np.testing.assert_allclose(values["posY"], np.arange(32) / 31)
  all_values = dsprites.latents_values()
  assert all_values.shape == (737_280, 6) and all_values.dtype == np.float64
  np.testing.assert_allclose(all_values[-1], [1, 3, 1, 2 * np.pi, 1, 1])
  np.testing.assert_allclose(all_values[33], [1, 1, 0.5, 0, 1 / 31, 1 / 31])


def test_sampling():
  rng = np.random.default_rng(2)
  classes = dsprites.sample_factors(rng, 5000)
  assert classes.shape == (5000, 6) and classes.dtype == np.int64
  np.testing.assert_array_equal(classes.min(0), [0] * 6)
  np.testing.assert_array_equal(classes.max(0), np.array(SIZES) - 1)
  fixed = dsprites.sample_with_fixed_factor(rng, 100, 3)
  assert np.unique(fixed[:, 3]).size == 1
  assert np.unique(fixed[:, 4]).size > 1
  chosen = dsprites.sample_with_fixed_factor(rng, 10, 1, value=2)
  np.testing.assert_array_equal(chosen[:, 1], 2)
  with pytest.raises(dsprites.DSpritesError):
    dsprites.sample_with_fixed_factor(rng, 10, 6)
  with pytest.raises(dsprites.DSpritesError):
    dsprites.sample_with_fixed_factor(rng, 10, 1, value=3)


# ----------------------------------------------------------------------------
# The renderer.


def test_render_is_deterministic_binary_and_matches_grid():
  classes = dsprites.sample_factors(np.random.default_rng(3), 300)
  first = dsprites.render_images(classes)
  second = dsprites.render_images(classes.copy())
  assert first.shape == (300, 64, 64) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, second)
  assert set(np.unique(first)) == {0, 1}
  # Rendering a grid by shifting templates equals rendering each image.
  grid = dsprites.render_grid(SMALL_GRID)
  np.testing.assert_array_equal(
      grid, dsprites.render_images(dsprites.grid_classes(SMALL_GRID)))


def test_shapes_visibly_differ():
  images = [_render_one(shape=s, x=10, y=10) for s in range(3)]
  for a, b in itertools.combinations(images, 2):
    assert np.sum(a != b) > 40


def test_position_moves_the_centroid():
  base = _centroid(_render_one(shape=2, orientation=7))
  for x, y in [(1, 0), (10, 0), (0, 5), (31, 31), (17, 3)]:
    moved = _centroid(_render_one(shape=2, orientation=7, x=x, y=y))
    # posX moves right (columns) and posY moves down (rows), one pixel each.
    np.testing.assert_allclose(moved - base, [y, x])


def test_sprite_is_never_clipped():
  # Every position is a whole shift of the same sprite: no pixel is lost at
  # the extreme positions, for the biggest sprites at every orientation.
  for shape, orientation in itertools.product(range(3), range(40)):
    counts = [_render_one(shape, 5, orientation, x, y).sum()
              for x, y in [(0, 0), (31, 0), (0, 31), (31, 31)]]
    assert len(set(counts)) == 1


def test_scale_grows_pixel_count():
  for shape, orientation in itertools.product(range(3), (0, 5, 13, 26)):
    counts = [_render_one(shape, scale, orientation, 16, 16).sum()
              for scale in range(6)]
    assert all(np.diff(counts) > 0), (shape, orientation, counts)
  # The documented size: a 21 x 21 square at scale 1.
  square = _render_one(0, 5, 0, 16, 16)
  rows, cols = np.nonzero(square)
  assert np.ptp(rows) + 1 == 21 and np.ptp(cols) + 1 == 21
  assert square.sum() == 21 * 21


def test_rotation_by_two_pi_is_the_identity():
  for shape in range(3):
    np.testing.assert_array_equal(_render_one(shape, 3, 0, 9, 20),
                                  _render_one(shape, 3, 39, 9, 20))
  # ... while a rotation by about 46 degrees changes the square.
  assert np.sum(_render_one(0, 5, 0) != _render_one(0, 5, 5)) > 40


def test_heart_is_upright_and_asymmetric():
  # At position class 0 the sprite is centred on pixel (16, 16).
  def around_centre(image):
    return image[1:32, 1:32]

  heart = around_centre(_render_one(shape=2))
  square = around_centre(_render_one(shape=0))
  ellipse = around_centre(_render_one(shape=1))
  # Mirror symmetric left-right, but not top-bottom ...
  np.testing.assert_array_equal(heart, heart[:, ::-1])
  assert np.sum(heart != heart[::-1]) > 20
  # ... unlike the square and the ellipse.
  np.testing.assert_array_equal(square, square[::-1])
  np.testing.assert_array_equal(ellipse, ellipse[::-1])
  # Lobes at the top: the upper half is wider than the lower half.
  assert heart[:15].sum() > heart[16:].sum()
  # Ellipse major axis horizontal at orientation 0.
  rows, cols = np.nonzero(ellipse)
  assert np.ptp(cols) > 1.8 * np.ptp(rows)


def test_mean_pixel_matches_calibration():
  images = dsprites.render_images(
      dsprites.sample_factors(np.random.default_rng(4), 4000))
  # The official set's mean pixel is about 0.043; the renderer is calibrated
  # to 0.0426 over the whole grid.
  assert 0.038 < images.mean() < 0.048


def test_supersampling_is_close_to_centre_sampling():
  classes = dsprites.sample_factors(np.random.default_rng(5), 200)
  centre = dsprites.render_images(classes)
  fine = dsprites.render_images(classes, supersample=4)
  assert abs(fine.sum() / centre.sum() - 1) < 0.05
  assert np.mean(fine != centre) < 0.01
  with pytest.raises(dsprites.DSpritesError):
    dsprites.render_images(classes, supersample=0)


# ----------------------------------------------------------------------------
# The render cache.


def test_render_cache_is_written_once_and_reused(tmp_path, monkeypatch):
  first = dsprites.render_to_cache(tmp_path, SMALL_GRID)
  path = dsprites.cache_path(tmp_path, SMALL_GRID)
  assert first.source == f"render:{path.resolve()}"
  assert isinstance(first.images, np.memmap)
  assert first.num_images == 2 * 2 * 3 * 3 * 2
  np.testing.assert_array_equal(first.images,
                                dsprites.render_grid(SMALL_GRID))
  np.testing.assert_array_equal(first.latents_classes,
                                dsprites.grid_classes(SMALL_GRID))
  np.testing.assert_allclose(
      first.latents_values,
      dsprites.classes_to_values(first.latents_classes))
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no .part left

  def fail(*args, **kwargs):
    raise AssertionError("the cache should have been reused")

  monkeypatch.setattr(dsprites, "render_grid", fail)
  second = dsprites.render_to_cache(tmp_path, SMALL_GRID)
  np.testing.assert_array_equal(second.images, first.images)


def test_render_cache_replaces_a_bad_file(tmp_path):
  path = dsprites.cache_path(tmp_path, SMALL_GRID)
  np.save(path, np.zeros((3, 64, 64), np.uint8))  # wrong count
  dataset = dsprites.render_to_cache(tmp_path, SMALL_GRID)
  assert dataset.images.shape == (72, 64, 64)
  np.testing.assert_array_equal(dataset.images,
                                dsprites.render_grid(SMALL_GRID))


def test_render_cache_leaves_nothing_on_failure(tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(dsprites, "render_grid", broken)
  with pytest.raises(KeyboardInterrupt):
    dsprites.render_to_cache(tmp_path, SMALL_GRID)
  assert list(tmp_path.iterdir()) == []


def test_auto_falls_back_to_render(tmp_path, monkeypatch):
  monkeypatch.setattr(dsprites, "FULL_GRID", SMALL_GRID)
  empty = tmp_path / "data"
  empty.mkdir()
  dataset = dsprites.load_dsprites(
      "auto", data_dir=empty, cache_dir=tmp_path / "cache",
      tfds_data_dir=str(tmp_path / "tfds"))
  assert dataset.source.startswith("render:")
  assert dataset.factor_sizes == SIZES
  assert dataset.factor_names == dsprites.FACTOR_NAMES
  assert dataset.imgs is dataset.images
  # A partial set renders what it lacks.
  classes = dsprites.sample_factors(np.random.default_rng(6), 20)
  np.testing.assert_array_equal(dataset.images_for(classes),
                                dsprites.render_images(classes))
  # And a second load reuses the same file.
  again = dsprites.load_dsprites("render", cache_dir=tmp_path / "cache")
  assert again.source == dataset.source


def test_complete_set_is_read_by_index():
  read = []

  class IndexedImages:
    """Stands in for the 3 GB array: image i is the rendered image of i."""
    shape = (dsprites.NUM_IMAGES, 64, 64)

    def __getitem__(self, index):
      read.append(np.asarray(index))
      return dsprites.render_images(dsprites.index_to_factors(index))

  dataset = dsprites.DSprites(
      images=IndexedImages(), latents_classes=dsprites.latents_classes(),
      latents_values=dsprites.latents_values(), source="test")
  assert dataset.is_complete
  classes = dsprites.sample_factors(np.random.default_rng(7), 50)
  np.testing.assert_array_equal(dsprites.images_for(classes, dataset),
                                dsprites.render_images(classes))
  assert np.all(np.diff(read[0]) >= 0)  # read in index order


# ----------------------------------------------------------------------------
# The official npz.


def _npz_path(tmp_path: pathlib.Path) -> pathlib.Path:
  directory = tmp_path / "dsprites"
  directory.mkdir(exist_ok=True)
  return directory / dsprites.NPZ_FILENAME


def test_npz_with_wrong_keys(tmp_path):
  path = _npz_path(tmp_path)
  np.savez(path, images=np.zeros((2, 64, 64), np.uint8))
  with pytest.raises(dsprites.DSpritesError) as excinfo:
    dsprites.load_dsprites("npz", data_dir=tmp_path)
  _one_line(excinfo, path, "imgs", "latents_classes", "images",
            "github.com/deepmind/dsprites-dataset")
  # A bad file where the official one belongs also stops "auto".
  with pytest.raises(dsprites.DSpritesError):
    dsprites.load_dsprites("auto", data_dir=tmp_path)


def test_npz_with_wrong_shapes(tmp_path):
  path = _npz_path(tmp_path)
  np.savez(path, imgs=np.zeros((10, 64, 64), np.uint8),
           latents_values=np.zeros((10, 6)),
           latents_classes=np.zeros((10, 6), np.int64))
  with pytest.raises(dsprites.DSpritesError) as excinfo:
    dsprites.load_dsprites("npz", data_dir=tmp_path)
  _one_line(excinfo, path, "imgs", "(10, 64, 64)", "(737280, 64, 64)")


def test_npz_that_is_not_a_zip(tmp_path):
  path = _npz_path(tmp_path)
  path.write_bytes(b"not a zip file")
  with pytest.raises(dsprites.DSpritesError) as excinfo:
    dsprites.load_dsprites("npz", data_dir=tmp_path)
  _one_line(excinfo, path, "not a readable npz")


def test_npz_missing(tmp_path):
  with pytest.raises(dsprites.DSpritesError) as excinfo:
    dsprites.load_dsprites("npz", data_dir=tmp_path)
  _one_line(excinfo, dsprites.NPZ_FILENAME, tmp_path / "dsprites")


def test_npz_is_read_and_checked(tmp_path, monkeypatch):
  # A small stand-in for the official file: the loader's checks are shrunk to
  # its size, everything else runs as for the real one.
  classes = dsprites.grid_classes(SMALL_GRID)
  num = classes.shape[0]
  monkeypatch.setattr(dsprites, "_NPZ_EXPECTED", {
      "imgs": (num, 64, 64), "latents_values": (num, 6),
      "latents_classes": (num, 6)})
  monkeypatch.setattr(dsprites, "latents_classes", lambda: classes)
  images = dsprites.render_grid(SMALL_GRID)
  path = _npz_path(tmp_path)
  np.savez_compressed(path, imgs=images, latents_classes=classes,
                      latents_values=dsprites.classes_to_values(classes))
  dataset = dsprites.load_dsprites("auto", data_dir=tmp_path)
  assert dataset.source == f"npz:{path.resolve()}"
  np.testing.assert_array_equal(dataset.images, images)
  # Rows out of the official order are refused.
  np.savez_compressed(path, imgs=images, latents_classes=classes[::-1],
                      latents_values=dsprites.classes_to_values(classes))
  with pytest.raises(dsprites.DSpritesError) as excinfo:
    dsprites.load_dsprites("npz", data_dir=tmp_path)
  _one_line(excinfo, path, "order")
  # So are grey levels.
  np.savez_compressed(path, imgs=images * 255, latents_classes=classes,
                      latents_values=dsprites.classes_to_values(classes))
  with pytest.raises(dsprites.DSpritesError) as excinfo:
    dsprites.load_dsprites("npz", data_dir=tmp_path)
  _one_line(excinfo, path, "zeros and ones")


def test_unknown_source():
  with pytest.raises(dsprites.DSpritesError) as excinfo:
    dsprites.load_dsprites("hdf5")
  _one_line(excinfo, "hdf5", "npz, tfds, render")


def test_tfds_not_prepared(tmp_path, monkeypatch):
  # As with the `tfds` extra installed; the folder check answers first.
  monkeypatch.setattr(dsprites.data_lib, "tfds_installed", lambda: True)
  with pytest.raises(dsprites.DSpritesError) as excinfo:
    dsprites.load_dsprites("tfds", tfds_data_dir=str(tmp_path))
  _one_line(excinfo, tmp_path, "tfds build dsprites")


def test_tfds_not_installed_names_the_extra(tmp_path, monkeypatch):
  monkeypatch.setattr(dsprites.data_lib, "tfds_installed", lambda: False)
  with pytest.raises(dsprites.DSpritesError) as excinfo:
    dsprites.load_dsprites("tfds", tfds_data_dir=str(tmp_path))
  _one_line(excinfo, "pip install -e '.[tfds]'")
