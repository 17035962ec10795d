"""End-to-end tests of the entry points experiments/mnist.py and frey_face.py.

The real command lines run as subprocesses (they inherit the 8 forced CPU
devices of conftest.py): a `smoke` run of each experiment, a rerun that
resumes, and a few bad inputs that must end with one `error: ...` line and
exit status 1, never a traceback. The other expected failures (an
incompatible checkpoint, missing data) are checked in-process, which is much
cheaper than a subprocess.

Each subprocess pays several seconds of imports and compilation, so they
all start at once in a module-scoped fixture and run side by side, and beside
the in-process tests.
"""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import matplotlib.image
import pytest

from conftest import require_real_data
from avb import config_utils
from avb import data
from avb import train
from experiments.configs import frey_face as frey_face_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
    os.environ.get("AVB_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
EXPERIMENTS = ("mnist", "frey_face")
SMOKE_STEPS = 30
TIMEOUT_S = 600
TRAIN_KEYS = ("loss", "elbo", "reconstruction", "kl", "kl_per_latent",
              "l2_grads", "l2_params", "steps_per_sec", "eta_seconds")
RERUN_STEPS = 40
FREY_FACE_FILE = "frey_face/frey_rawface.mat"
# A console line longer than this is not read at a glance.
MAX_LINE_CHARS = 200
SUMMARY_KEYS = ("train_elbo", "test_elbo", "test_log_likelihood", "steps",
                "examples_seen", "wall_time_s")


class Run:
  """A finished subprocess: its workdir, exit status and output."""

  def __init__(self, workdir: pathlib.Path, returncode: int, stdout: str,
               stderr: str):
    self.workdir = workdir
    self.returncode = returncode
    self.stdout = stdout
    self.stderr = stderr

  def last_stderr_line(self) -> str:
    lines = [line for line in self.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _command(experiment: str, *args: str) -> list[str]:
  return [sys.executable, "-m", f"experiments.{experiment}", *args]


# `python -m experiments.mnist ...`, run by runpy exactly as -m runs it, which
# at exit writes the names of the TensorFlow modules it imported (none, on the
# base install's path) to the file named by AVB_TEST_MODULES_FILE.
_RECORD_MODULES = """
import atexit, os, runpy, sys
def _record():
  names = sorted(m for m in sys.modules if m.split(".")[0] in (
      "tensorflow", "tensorflow_datasets", "keras"))
  with open(os.environ["AVB_TEST_MODULES_FILE"], "w") as f:
    f.write("\\n".join(names))
atexit.register(_record)
sys.argv[0] = "experiments/mnist.py"
runpy.run_module("experiments.mnist", run_name="__main__", alter_sys=True)
"""


def _command_recording_modules(*args: str) -> list[str]:
  return [sys.executable, "-c", _RECORD_MODULES, *args]


def _smoke_args(experiment: str, workdir: pathlib.Path) -> list[str]:
  return [f"--config=experiments/configs/{experiment}.py:smoke",
          f"--workdir={workdir}"]


class Background:
  """Subprocesses started at once from the repo root, waited on when needed.

  Output goes to files, not pipes, so a chatty process never blocks on a full
  pipe while another one is being waited on.
  """

  def __init__(self, log_dir: pathlib.Path):
    self.log_dir = log_dir
    self._log_dir = log_dir
    self._log_dir.mkdir(parents=True, exist_ok=True)
    self._env = dict(os.environ)
    if SHARED_DATA.is_dir():
      self._env.setdefault("AVB_DATA_DIR", str(SHARED_DATA))
    self._started = {}
    self._finished = {}

  def start(self, name: str, argv: list[str], workdir: pathlib.Path,
            niceness: int = 0, env: dict[str, str] | None = None) -> None:
    """Starts `argv`; a positive `niceness` lets the others go first."""
    out = open(self._log_dir / f"{name}.out", "w")
    err = open(self._log_dir / f"{name}.err", "w")
    process = subprocess.Popen(
        argv, cwd=REPO_ROOT, env={**self._env, **(env or {})}, stdout=out,
        stderr=err,
        stdin=subprocess.DEVNULL,
        preexec_fn=(lambda: os.nice(niceness)) if niceness else None)
    self._started[name] = (process, workdir, out, err)

  def result(self, name: str) -> Run:
    """Waits for the process `name` and returns its Run."""
    if name not in self._finished:
      process, workdir, out, err = self._started[name]
      try:
        returncode = process.wait(timeout=TIMEOUT_S)
      except subprocess.TimeoutExpired:
        process.kill()
        returncode = process.wait()
      out.close()
      err.close()
      self._finished[name] = Run(
          workdir, returncode, (self._log_dir / f"{name}.out").read_text(),
          (self._log_dir / f"{name}.err").read_text())
    return self._finished[name]

  def stop(self) -> None:
    """Kills what is still running (a test that failed early)."""
    for process, _, out, err in self._started.values():
      if process.poll() is None:
        process.kill()
        process.wait()
      out.close()
      err.close()


def _read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()
          if line.strip()]


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.is_dir() and p.name.isdigit())


def _finite(value) -> bool:
  if isinstance(value, list):
    return all(_finite(v) for v in value)
  return isinstance(value, (int, float)) and math.isfinite(value)


BAD_INPUTS = {
    # name: (extra flags, text the error line must contain)
    "unknown_field": (["--config.model.bogus=1"], "config.model.bogus"),
    "unknown_config_arg": (["--config=experiments/configs/mnist.py:smok"],
                           "'smok'"),
    "zero_latents": (["--config.model.num_latents=0"], "model.num_latents=0"),
    "workdir_is_a_file": ([], "is a file"),
}


@pytest.fixture(scope="module")
def background(tmp_path_factory):
  """Starts every subprocess of this file at once.

  These are a `smoke` run per experiment and one run per BAD_INPUTS entry.
  Most of their time goes to imports and compilation, so running them side by
  side, and beside the in-process tests, shortens the file a lot.
  """
  root = tmp_path_factory.mktemp("cli")
  runs = Background(root / "logs")
  for experiment in EXPERIMENTS:
    if experiment == "frey_face" and not (SHARED_DATA / FREY_FACE_FILE).is_file():
      continue  # Its tests are skipped; MNIST has an offline fallback.
    workdir = root / experiment
    if experiment == "mnist":
      runs.start(experiment, _command_recording_modules(
          *_smoke_args(experiment, workdir)), workdir,
                 env={"AVB_TEST_MODULES_FILE": str(root / "modules.txt")})
    else:
      runs.start(experiment,
                 _command(experiment, *_smoke_args(experiment, workdir)),
                 workdir)
  for name, (flags, _) in BAD_INPUTS.items():
    workdir = root / f"bad_{name}"
    if name == "workdir_is_a_file":
      workdir.write_text("not a directory")
    config_flag, workdir_flag = _smoke_args("mnist", workdir)
    # A later --config= replaces the first; --config.x=... overrides add to it.
    # Niced: the MNIST smoke run is on the critical path (the rerun waits
    # for it); these are not.
    runs.start(f"bad_{name}",
               _command("mnist", config_flag, *flags, workdir_flag), workdir,
               niceness=10)
  yield runs
  runs.stop()


def _smoke_result(background: Background, experiment: str) -> Run:
  if experiment == "frey_face":
    require_real_data(FREY_FACE_FILE)
  run = background.result(experiment)
  assert run.returncode == 0, run.stderr[-3000:]
  return run


@pytest.fixture(scope="module")
def mnist_rerun(background, tmp_path_factory):
  """Starts the MNIST smoke command again on a copy of its finished workdir.

  Returns:
    (the first run, the copy's path); `background.result("rerun")` waits for
    the rerun.
  """
  first = _smoke_result(background, "mnist")
  # A copy, so the other tests still see the first run's files.
  workdir = tmp_path_factory.mktemp("rerun") / "mnist"
  shutil.copytree(first.workdir, workdir)
  # Ten more steps than the finished run: the rerun must resume at 30.
  background.start("rerun", _command("mnist", *_smoke_args("mnist", workdir),
                                     f"--config.training.num_steps={RERUN_STEPS}"),
                   workdir)
  return first, workdir


# ----------------------------------------------------------------------------
# Expected failures inside train_and_evaluate, in-process: much cheaper than
# a subprocess, and they run while the subprocesses do.


@pytest.mark.usefixtures("background")
@pytest.mark.parametrize("source", ["auto", "local"])
def test_missing_frey_face_data_is_a_data_error(tmp_path, monkeypatch, source):
  empty = tmp_path / "empty"
  empty.mkdir()
  # Offline, the error must come at once, not after a download attempt.
  monkeypatch.setattr(data, "network_available", lambda *a, **k: False)
  config = frey_face_config.get_config("smoke")
  config.data.data_dir = str(empty)
  config.data.source = source
  with pytest.raises(data.DataError) as info:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(info.value)
  assert str(empty) in message
  assert "frey_rawface.mat" in message
  assert "\n" not in message


@pytest.mark.usefixtures("mnist_rerun")  # So the rerun runs meanwhile.
def test_incompatible_checkpoint_is_a_config_error(background, tmp_path,
                                                   monkeypatch):
  # The frey_face smoke run's workdir: unlike MNIST, loading its data does not
  # import TensorFlow, so this test stays cheap.
  first = _smoke_result(background, "frey_face")
  workdir = tmp_path / "frey_face"
  shutil.copytree(first.workdir, workdir)
  files_before = sorted(p for p in workdir.rglob("*"))
  monkeypatch.setattr(data, "network_available", lambda *a, **k: False)
  config = frey_face_config.get_config("smoke")
  config.model.num_latents = 3  # The smoke run has 4.

  with pytest.raises(config_utils.ConfigError) as info:
    train.train_and_evaluate(config, str(workdir))

  message = str(info.value)
  assert str(workdir) in message
  assert "different model" in message
  assert "\n" not in message
  # The old run is left as it was.
  assert sorted(p for p in workdir.rglob("*")) == files_before


def test_rerun_resumes_from_the_last_checkpoint(background, mnist_rerun):
  first, workdir = mnist_rerun
  train_before = [r for r in _read_jsonl(first.workdir / "metrics.jsonl")
                  if r["split"] == "train"]

  rerun = background.result("rerun")

  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "Traceback" not in rerun.stderr
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["resumed_from_step"] == SMOKE_STEPS
  assert summary["steps"] == RERUN_STEPS
  # Steps 1..30 were not trained again: the old records are kept and only the
  # new interval's record is added.
  train_after = [r for r in _read_jsonl(workdir / "metrics.jsonl")
                 if r["split"] == "train"]
  assert train_after[:len(train_before)] == train_before
  assert [r["step"] for r in train_after[len(train_before):]] == [RERUN_STEPS]
  assert _checkpoint_steps(workdir)[-1] == RERUN_STEPS


# ----------------------------------------------------------------------------
# What the smoke runs wrote.


@pytest.fixture(params=EXPERIMENTS)
def smoke_run(request, background) -> Run:
  return _smoke_result(background, request.param)


def test_smoke_run_succeeds_without_traceback(smoke_run):
  assert "Traceback" not in smoke_run.stderr


def test_smoke_run_writes_checkpoints(smoke_run):
  steps = _checkpoint_steps(smoke_run.workdir)
  assert steps and steps[-1] == SMOKE_STEPS, steps


def test_smoke_run_writes_metrics_jsonl(smoke_run):
  records = _read_jsonl(smoke_run.workdir / "metrics.jsonl")
  summary = json.loads((smoke_run.workdir / "summary.json").read_text())
  num_latents = summary["num_latents"]
  train_records = [r for r in records if r["split"] == "train"]
  test_records = [r for r in records if r["split"] == "test"]
  assert [r["step"] for r in train_records] == [10, 20, 30]  # log_every 10
  for record in train_records:
    for key in TRAIN_KEYS:
      assert key in record, (key, record)
      assert _finite(record[key]), (key, record)
    assert len(record["kl_per_latent"]) == num_latents
    # The KL of a diagonal Gaussian to N(0, I) splits over the latents.
    assert sum(record["kl_per_latent"]) == pytest.approx(record["kl"], rel=1e-4)
  assert train_records[-1]["eta_seconds"] == pytest.approx(0, abs=1e-6)
  assert any("elbo" in r for r in test_records)
  assert any("log_likelihood" in r for r in test_records)
  for record in test_records:
    assert all(_finite(v) for k, v in record.items() if k != "split")


def test_smoke_run_writes_tensorboard_events(smoke_run):
  events = list(smoke_run.workdir.glob("**/events.out.tfevents.*"))
  assert events, list(smoke_run.workdir.iterdir())
  assert all(e.stat().st_size > 0 for e in events)


def test_tensorboard_lists_the_scalars_as_written(smoke_run):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  accumulator = event_accumulator.EventAccumulator(str(smoke_run.workdir))
  accumulator.Reload()
  tags = accumulator.Tags()
  for name in ("train/loss", "train/elbo", "train/kl_per_latent/000",
               "test/elbo", "test/log_likelihood"):
    assert name in tags["scalars"], (name, tags["scalars"][:20])
  assert {"reconstructions", "samples"} <= set(tags["images"])
  train_records = [r for r in _read_jsonl(smoke_run.workdir / "metrics.jsonl")
                   if r["split"] == "train"]
  events = accumulator.Scalars("train/elbo")
  assert [e.step for e in events] == [r["step"] for r in train_records]
  assert [e.value for e in events] == pytest.approx(
      [r["elbo"] for r in train_records], rel=1e-6)


def test_smoke_run_console_is_short_and_free_of_library_noise(smoke_run):
  lines = (smoke_run.stdout + smoke_run.stderr).splitlines()
  too_long = [line for line in lines if len(line) > MAX_LINE_CHARS]
  assert not too_long, too_long[:3]
  head = "\n".join(lines[:20]).lower()
  for noise in ("libtpu", "tensorflow", "onednn", "font cache", "tfds",
                "dataset_info", "warning"):
    assert noise not in head, (noise, lines[:20])
  # The start-up block is printed once and names the data's source.
  assert sum("AEVB run:" in line for line in lines) == 1
  assert sum(" train: " in line and "examples from" in line
             for line in lines) == 1
  progress = [line for line in lines if "step 30/30" in line]
  assert progress and any("ex/s" in line for line in progress), lines


def test_mnist_run_never_imports_tensorflow(background):
  _smoke_result(background, "mnist")
  record = pathlib.Path(background.log_dir.parent / "modules.txt")
  assert record.is_file(), "the run did not record its modules"
  assert record.read_text() == "", record.read_text()


def test_smoke_run_writes_summary(smoke_run):
  summary = json.loads((smoke_run.workdir / "summary.json").read_text())
  config = json.loads((smoke_run.workdir / "config.json").read_text())
  for key in SUMMARY_KEYS:
    assert _finite(summary[key]), (key, summary)
  assert summary["steps"] == SMOKE_STEPS
  batch_size = config["training"]["batch_size"]
  assert summary["examples_seen"] == SMOKE_STEPS * batch_size
  assert summary["resumed_from_step"] is None


def test_smoke_run_writes_image_grids(smoke_run):
  for name in ("reconstructions", "samples"):
    paths = list((smoke_run.workdir / "images").glob(f"{name}_*.png"))
    assert paths, name
    for path in paths:
      image = matplotlib.image.imread(path)
      assert image.ndim in (2, 3) and image.shape[0] > 0 and image.shape[1] > 0
      assert image.min() >= 0 and image.max() <= 1
      assert image.std() > 0, f"{path} is blank"


# ----------------------------------------------------------------------------
# Bad input on the command line.


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_one_error_line(background, name):
  run = background.result(f"bad_{name}")
  expected = BAD_INPUTS[name][1]
  assert run.returncode == 1, run.stderr[-3000:]
  assert "Traceback" not in run.stderr, run.stderr[-3000:]
  last = run.last_stderr_line()
  assert last.startswith("error: "), run.stderr[-3000:]
  assert expected in last, last
  if name == "workdir_is_a_file":
    assert str(run.workdir) in last
  else:
    # Rejected before anything was written.
    assert not run.workdir.exists()
