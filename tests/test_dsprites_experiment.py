"""End-to-end tests of experiments/dsprites.py and avb/dsprites_experiment.py.

The `smoke` variants of both configs run as real command lines (subprocesses,
started together at module scope so their imports and compilation overlap
with the in-process tests). They train on a 1,536-image sub-grid rendered
into a temporary AVB_CACHE_DIR, never the 3 GB full set. Exact resume, the
KeyboardInterrupt checkpoint and most bad inputs are checked in-process,
which is much cheaper than a subprocess.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import matplotlib.image
import numpy as np
import pytest

from avb import config_utils
from avb import data as data_lib
from avb import dsprites
from avb import dsprites_experiment
from avb import input_pipeline
from avb import objectives
from avb import train
from experiments.configs import beta_vae_dsprites
from experiments.configs import capacity_dsprites

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
CONFIGS = {"beta_vae": "experiments/configs/beta_vae_dsprites.py",
           "capacity": "experiments/configs/capacity_dsprites.py"}
BAD_CLI_INPUTS = {
    # name: (config, extra flags, text the one error line must contain)
    "metric_without_factors": (
        "beta_vae", ["--config.data.name=mnist"],
        "needs ground-truth factors"),
    "zero_capacity_steps": (
        "capacity", ["--config.objective.capacity_steps=0"],
        "config.objective.capacity_steps=0 is invalid"),
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """A private dSprites render cache for this module (in-process and children)."""
  path = tmp_path_factory.mktemp("dsprites_cache")
  previous = os.environ.get("AVB_CACHE_DIR")
  os.environ["AVB_CACHE_DIR"] = str(path)
  yield path
  if previous is None:
    os.environ.pop("AVB_CACHE_DIR", None)
  else:
    os.environ["AVB_CACHE_DIR"] = previous


@pytest.fixture(scope="module")
def background(cache_dir, tmp_path_factory):
  """Starts the smoke runs and the bad-input command lines at once."""
  root = tmp_path_factory.mktemp("dsprites_cli")
  # One CPU device per child: the sharded path is exercised in-process (8
  # forced devices, conftest.py); the children test the command line, and
  # are much faster unsharded on a 2-core machine.
  flags = os.environ.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "").strip()
  env = dict(os.environ, AVB_CACHE_DIR=str(cache_dir), XLA_FLAGS=flags)
  started = {}

  def start(name, argv, niceness=0):
    out = open(root / f"{name}.out", "w")
    err = open(root / f"{name}.err", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.dsprites", *argv], cwd=REPO_ROOT,
        env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
        preexec_fn=(lambda: os.nice(niceness)) if niceness else None)
    started[name] = (process, out, err)

  for name, path in CONFIGS.items():
    start(name, [f"--config={path}:smoke", f"--workdir={root / name}"])
  for name, (config, flags, _) in BAD_CLI_INPUTS.items():
    start(f"bad_{name}", [f"--config={CONFIGS[config]}:smoke", *flags,
                          f"--workdir={root / ('bad_' + name)}"], niceness=10)

  def result(name):
    process, out, err = started[name]
    try:
      code = process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      process.kill()
      code = process.wait()
    out.close()
    err.close()
    return code, (root / f"{name}.err").read_text(), root / name

  yield result
  for process, out, err in started.values():
    if process.poll() is None:
      process.kill()
      process.wait()
    out.close()
    err.close()


def _read_jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines() if line]


def _finished(background, name):
  code, stderr, workdir = background(name)
  assert code == 0, stderr[-3000:]
  assert "Traceback" not in stderr
  return workdir


# ----------------------------------------------------------------------------
# In-process: resume, interruption, bad inputs.


def _tiny(**overrides):
  """The capacity smoke config trimmed to one run's training: no metrics."""
  config = capacity_dsprites.get_config("smoke").unlock()
  config.sweep.axis = None
  config.sweep.seeds = ()
  config.eval.metrics = ()
  config.eval.traversal_gif = False
  config.training.num_steps = 16
  config.training.checkpoint_every = 8
  config.training.log_every = 4
  config.objective.capacity_steps = 12
  for key, value in overrides.items():
    section, field = key.split("__")
    config[section][field] = value
  return config.lock()


def _final_params(workdir):
  manager = train.checkpoint_manager(pathlib.Path(workdir), 2)
  step = manager.latest_step()
  restored = manager.restore(step)
  manager.close()
  return restored["params"], step


def _capacities(workdir):
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [(r["step"], r["capacity"]) for r in
          dsprites_experiment.read_train_records(path)]


# The slow tests start the command lines first, so these run beside them; the
# default (fast) run starts none of them.
_BESIDE_THE_COMMAND_LINES = pytest.mark.usefixtures("background")


@pytest.mark.slow
@_BESIDE_THE_COMMAND_LINES
def test_interrupted_run_resumes_exactly_with_the_same_capacity_schedule(
    tmp_path, monkeypatch):
  config = _tiny()
  reference = dsprites_experiment.train_and_evaluate(config, str(tmp_path / "ref"))

  original = input_pipeline.Prefetcher.get

  def get(self, step):  # Ctrl-C while fetching step 10's batch
    if step == 10:
      raise KeyboardInterrupt
    return original(self, step)
  monkeypatch.setattr(input_pipeline.Prefetcher, "get", get)
  with pytest.raises(KeyboardInterrupt):
    dsprites_experiment.train_and_evaluate(config, str(tmp_path / "run"))
  monkeypatch.undo()
  # The periodic checkpoint was at 8; the interruption saved step 10 too.
  assert _final_params(tmp_path / "run")[1] == 10
  # Resuming with another schedule or model is refused, naming the cause.
  for changed, text in ((_tiny(objective__capacity_steps=99), "capacity_steps=12"),
                        (_tiny(objective__gamma=5.0), "a different sweep"),
                        (_tiny(model__num_latents=3), "a different model")):
    with pytest.raises(config_utils.ConfigError, match=text):
      dsprites_experiment.train_and_evaluate(changed, str(tmp_path / "run"))
  resumed = dsprites_experiment.train_and_evaluate(config, str(tmp_path / "run"))
  assert resumed["resumed_from_step"] == 10 and resumed["steps"] == 16
  for a, b in zip(jax.tree.leaves(_final_params(tmp_path / "ref")[0]),
                  jax.tree.leaves(_final_params(tmp_path / "run")[0])):
    np.testing.assert_array_equal(a, b)
  # C is logged at the step: the interrupted run's sequence is the schedule.
  expected = [(s, float(objectives.capacity_schedule(s, 5.0, 12)))
              for s in (4, 8, 12, 16)]
  assert _capacities(tmp_path / "ref") == expected
  assert _capacities(tmp_path / "run") == expected
  assert resumed["kl_per_latent"] == reference["kl_per_latent"]
  # A finished run started again trains nothing and returns its summary.
  again = dsprites_experiment.train_and_evaluate(config, str(tmp_path / "run"))
  assert again == json.loads((tmp_path / "run" / "summary.json").read_text())


def _config(objective="beta_vae", **overrides):
  module = capacity_dsprites if objective == "capacity" else beta_vae_dsprites
  config = module.get_config("smoke").unlock()
  for key, value in overrides.items():
    *sections, field = key.split("__")
    target = config
    for section in sections:
      target = target[section]
    target[field] = value
  return config.lock()


@pytest.mark.parametrize("objective,overrides,text", [
    ("beta_vae", dict(objective__beta=-1.0), "config.objective.beta=-1.0"),
    ("beta_vae", dict(sweep__grid=(1.0, -4.0)), "config.objective.beta=-4.0"),
    ("capacity", dict(objective__gamma=-1000.0), "config.objective.gamma=-1000.0"),
    ("capacity", dict(objective__capacity_max=-25.0),
     "config.objective.capacity_max=-25.0"),
    ("capacity", dict(objective__capacity_steps=0),
     "config.objective.capacity_steps=0"),
    ("beta_vae", dict(data__name="fashion_mnist"), "needs ground-truth factors"),
    ("beta_vae", dict(eval__traversal_range=(2.0, -2.0)),
     "config.eval.traversal_range=(2.0, -2.0) is invalid: the range is empty"),
    ("beta_vae", dict(eval__traversal_range=(1.0, 1.0)), "the range is empty"),
    ("beta_vae", dict(eval__traversal_steps=1), "eval.traversal_steps=1"),
    ("beta_vae", dict(eval__metrics=("mig", "sap")), "eval.metrics"),
    ("beta_vae", dict(data__factor_strides=(1, 1, 0, 1, 1, 1)),
     "data.factor_strides"),
    ("beta_vae", dict(model__architecture="resnet"), "model.architecture"),
    ("beta_vae", dict(sweep__seeds=(0, 0)), "sweep.seeds"),
    ("beta_vae", dict(eval__beta_vae__num_train=1), "eval.beta_vae.num_train=1"),
])
def test_bad_config_is_a_one_line_config_error(objective, overrides, text):
  config = _config(objective, **overrides)
  with pytest.raises(config_utils.ConfigError) as error:
    dsprites_experiment.validate_config(config, num_devices=8)
  assert text in str(error.value) and "\n" not in str(error.value)


def test_a_dsprites_file_with_wrong_keys_is_a_one_line_data_error(tmp_path):
  directory = tmp_path / "dsprites"
  directory.mkdir()
  np.savez(directory / dsprites.NPZ_FILENAME, images=np.zeros((2, 64, 64)))
  config = _config(data__source="npz", data__data_dir=str(tmp_path))
  with pytest.raises(data_lib.DataError) as error:
    dsprites_experiment.train_and_evaluate(config, str(tmp_path / "run"))
  assert "lacks array(s)" in str(error.value) and "\n" not in str(error.value)


def test_sweep_runs_cross_the_axis_with_seeds():
  runs, swept = dsprites_experiment.sweep_runs(_config())
  assert swept and [r.label for r in runs] == [
      "beta=1,seed=0", "beta=1,seed=1", "beta=4,seed=0", "beta=4,seed=1"]
  assert [r.hyper["beta"] for r in runs] == [1.0, 1.0, 4.0, 4.0]
  assert [r.seed for r in runs] == [0, 1, 0, 1]
  single, swept = dsprites_experiment.sweep_runs(
      _config(sweep__axis=None, sweep__seeds=()))
  assert not swept and len(single) == 1


def test_sub_grid_metrics_read_the_right_images(cache_dir):
  """images_for of the sub-grid maps its class indices to dSprites classes."""
  factor_data = dsprites_experiment.load_data(_config())
  assert factor_data.factor_sizes == (1, 3, 2, 4, 8, 8)
  assert factor_data.images.shape == (1536, 64, 64)
  classes = np.array([[0, 2, 1, 3, 7, 5], [0, 0, 0, 0, 0, 0]])
  full = np.array([[0, 2, 5, 30, 28, 20], [0, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(factor_data.images_for(classes),
                                dsprites.render_images(full))
  # Row order of the training images is the sub-grid's, last factor fastest:
  # row 1 is posY class 1 of the sub-grid, dSprites' posY class 4.
  np.testing.assert_array_equal(
      factor_data.images[[0, 1]],
      dsprites.render_images(np.array([[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 4]])))


# ----------------------------------------------------------------------------
# The smoke command lines.


@pytest.mark.slow
def test_beta_vae_smoke_run_scores_every_run(background):
  workdir = _finished(background, "beta_vae")
  summary = json.loads((workdir / "summary.json").read_text())
  labels = sorted(r["label"] for r in summary["runs"])
  assert labels == ["beta=1,seed=0", "beta=1,seed=1", "beta=4,seed=0",
                    "beta=4,seed=1"]
  assert [row["value"] for row in summary["by_value"]] == [1.0, 4.0]
  for row in summary["by_value"]:
    assert row["num_runs"] == 2
    for metric in dsprites_experiment.METRICS:
      assert 0.0 <= row[metric]["mean"] <= 1.0
  run = json.loads((workdir / "sweep" / "beta=4,seed=1" / "summary.json").read_text())
  assert run["seed"] == 1 and run["hyper"]["beta"] == 4.0
  assert run["normalised_beta"] == pytest.approx(4.0 * 4 / 4096)
  assert run["data_source"].startswith("render:")
  assert len(run["kl_per_latent"]) == 4 and sorted(run["latents_by_kl"]) == [0, 1, 2, 3]
  assert set(run["scores"]) == set(dsprites_experiment.METRICS)
  # Pictures: traversals (one PNG per input: 4 latents x 5 values), GIF,
  # reconstructions, samples and the KL curves.
  images = workdir / "sweep" / "beta=4,seed=1" / "images"
  traversal = matplotlib.image.imread(images / "traversal_0_00000030.png")
  assert traversal.shape[:2] == (4 * 65 - 1, 5 * 65 - 1)
  for name in ("traversal_1_00000030.png", "traversal_00000030.gif",
               "reconstructions_00000030.png", "samples_00000030.png",
               "kl_per_latent.png"):
    assert (images / name).stat().st_size > 0, name
  records = [r for r in _read_jsonl(images.parent / "metrics.jsonl")
             if r["split"] == "train"]
  assert [r["step"] for r in records] == [10, 20, 30]
  assert all(len(r["kl_per_latent"]) == 4 and r["beta"] == 4.0 for r in records)


@pytest.mark.slow
def test_capacity_smoke_run_logs_the_schedule(background):
  workdir = _finished(background, "capacity")
  summary = json.loads((workdir / "summary.json").read_text())
  assert len(summary["runs"]) == 4
  run_dir = workdir / "sweep" / "gamma=100,seed=0"
  records = [r for r in _read_jsonl(run_dir / "metrics.jsonl")
             if r["split"] == "train"]
  # smoke: C_max = 5 nats over 20 steps; logged at the step, not averaged.
  assert [r["capacity"] for r in records] == pytest.approx([2.5, 5.0, 5.0])
  assert all(r["gamma"] == 100.0 for r in records)
  assert (run_dir / "images" / "kl_per_latent.png").stat().st_size > 0
  run = json.loads((run_dir / "summary.json").read_text())
  assert run["capacity_final"] == 5.0 and run["objective"] == "capacity"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BAD_CLI_INPUTS))
def test_bad_command_line_is_one_error_line(background, name):
  code, stderr, _ = background(f"bad_{name}")
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert code == 1, stderr[-2000:]
  assert lines[-1].startswith("error: ") and BAD_CLI_INPUTS[name][2] in lines[-1]
  assert "Traceback" not in stderr
