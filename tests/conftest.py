"""Test set-up: 8 forced CPU devices, so sharded code is exercised on any machine.

The flag must be set before jax is imported anywhere, which is why it lives at the
top of conftest.py (pytest imports it before any test module).
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# Keep TensorFlow (used only by tfds and TensorBoard writers) off any accelerator
# and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
    os.environ.get("AVB_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  """The real data directory (../shared/data unless AVB_DATA_DIR says otherwise)."""
  if not SHARED_DATA.is_dir():
    message = f"real data not found at {SHARED_DATA} (set AVB_DATA_DIR)"
    if os.environ.get("CI"):
      pytest.fail(message)  # CI always has ../shared beside the clone.
    pytest.skip(message)
  return SHARED_DATA
