"""Tests for avb/gradient_variance.py and the experiments/gradient_variance.py entry point.

The math is checked on a tiny VAE (16 pixels, J = 2): every estimator's
per-draw encoder gradients agree in mean with the reparameterized ones
within Monte Carlo error, the score-function variance is far larger and the
baselines shrink it, and the fast per-leaf covariance trace equals
`estimators.gradient_variance_stats`. One `smoke` run goes through the
real command line as a subprocess, started first so that it runs beside the
in-process tests; bad `config.variance` values are checked in-process (the
command line's one-line error path is exercised by tests/test_cvae.py and
tests/test_cli.py).
"""

import csv
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
import ml_collections
import numpy as np
import pytest

from avb import config_utils
from avb import estimators
from avb import gradient_variance as gv
from avb import models
from experiments.configs import gradient_variance as gv_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
    os.environ.get("AVB_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
TIMEOUT_S = 600


# ----------------------------------------------------------------------------
# The subprocesses, started before anything else in this file.


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
  """Starts the smoke run; yields name -> (process, workdir, log)."""
  root = tmp_path_factory.mktemp("gradient_variance_cli")
  env = dict(os.environ)
  if SHARED_DATA.is_dir():
    env.setdefault("AVB_DATA_DIR", str(SHARED_DATA))
  commands = {"smoke": []}
  started = {}
  for name, extra in commands.items():
    workdir = root / name
    log = open(root / f"{name}.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.gradient_variance",
         "--config=experiments/configs/gradient_variance.py:smoke",
         f"--workdir={workdir}", *extra],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL)
    started[name] = (process, workdir, log, root / f"{name}.log")
  yield started
  for process, _, log, _ in started.values():
    if process.poll() is None:
      process.kill()
      process.wait()
    log.close()


def _finished(cli_runs, name):
  process, workdir, log, log_path = cli_runs[name]
  try:
    returncode = process.wait(timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired:
    process.kill()
    returncode = process.wait()
  log.flush()
  return returncode, workdir, log_path.read_text()


@pytest.fixture(scope="module", autouse=True)
def _start_subprocesses_first(cli_runs):
  del cli_runs


# ----------------------------------------------------------------------------
# A tiny VAE.


MODEL = models.ModelConfig(data_shape=(16,), num_latents=2, hidden_sizes=(8,),
                           init="lecun")


def _setup(seed=0, batch=3):
  params = models.init_params(MODEL, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  images = (rng.random((batch, 16)) < 0.4).astype(np.float32)
  return params, jnp.asarray(images)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _draws_jit(estimator, num_samples, num_draws, params, x, baseline, key):
  objective = gv.example_objective(MODEL, estimator, num_samples)
  keys = jax.random.split(key, num_draws)
  return gv.per_draw_gradients(objective, params, x, keys, baseline)


def _draws(estimator, num_samples, num_draws, x, params, baseline=0.0, seed=1):
  return _draws_jit(estimator, num_samples, num_draws, params, x,
                    jnp.float32(baseline), jax.random.key(seed))


def _flat(tree):
  return jnp.concatenate([jnp.reshape(leaf, (leaf.shape[0], -1))
                          for leaf in jax.tree.leaves(tree)], axis=1)


def test_objective_value_is_the_same_estimate_for_every_estimator():
  params, images = _setup()

  @jax.jit
  def values(params, x, key):
    return jnp.stack([gv.example_objective(MODEL, name, 4)(
        params["encoder"], params["decoder"], x, key, jnp.float32(-5.0))
                      for name in gv.ESTIMATORS])

  got = values(params, images[0], jax.random.key(3))
  np.testing.assert_allclose(got, got[0], rtol=1e-5)


@pytest.mark.slow
def test_score_function_and_reparameterized_agree_in_mean():
  params, images = _setup()
  num_draws = 20_000
  mean_baseline = -11.0

  def output_layer_biases(grads):
    # The biases of the (mean, log_var) heads: their gradient is the
    # gradient with respect to the encoder's outputs, through which every
    # other encoder gradient passes. Four coordinates, none identically 0.
    return jnp.concatenate([grads["mean"]["bias"], grads["log_var"]["bias"]], 1)

  reference = output_layer_biases(
      _draws(gv.REPARAMETERIZED, 2, num_draws, images[0], params))
  for name in (gv.SCORE_FUNCTION, gv.MEAN_BASELINE, gv.LEAVE_ONE_OUT):
    grads = output_layer_biases(_draws(name, 2, num_draws, images[0], params,
                                       baseline=mean_baseline, seed=2))
    difference = jnp.mean(grads, 0) - jnp.mean(reference, 0)
    stderr = jnp.sqrt((jnp.var(grads, 0) + jnp.var(reference, 0)) / num_draws)
    # Unbiased: each difference is within 4.5 standard errors (a false alarm
    # has probability below 1e-4 per coordinate).
    assert bool(jnp.all(jnp.abs(difference) < 4.5 * stderr)), (name, difference,
                                                                stderr)


def test_score_function_variance_is_much_larger_and_baselines_reduce_it():
  params, images = _setup()

  def trace(name, baseline=0.0):
    # The same draws as the test above (shared compilations).
    grads = _draws(name, 2, 20_000, images[0], params, baseline=baseline)
    return float(estimators.gradient_variance_stats(grads)["total"]["trace_cov"])

  reparameterized = trace(gv.REPARAMETERIZED)
  score_function = trace(gv.SCORE_FUNCTION)
  assert score_function > 10 * reparameterized
  assert trace(gv.MEAN_BASELINE, baseline=-11.0) < score_function / 2
  assert trace(gv.LEAVE_ONE_OUT) < score_function / 2


def test_per_leaf_trace_cov_equals_gradient_variance_stats():
  params, images = _setup()
  grads = _draws(gv.SCORE_FUNCTION, 2, 64, images[1], params)
  mean = jax.tree.map(lambda g: jnp.mean(g, 0), grads)
  fast = gv.per_leaf_trace_cov(grads, mean)
  slow = estimators.gradient_variance_stats(grads)["per_leaf"]["trace_cov"]
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow)):
    np.testing.assert_allclose(a, b, rtol=1e-4)


@pytest.mark.slow
def test_measure_sums_equal_per_example_statistics():
  params, images = _setup(batch=3)
  num_draws = 16
  combinations = ((gv.REPARAMETERIZED, 2), (gv.LEAVE_ONE_OUT, 2))
  rng = jax.random.key(7)
  sums = gv.make_measure(MODEL, combinations, num_draws, 4)(params, images, rng)
  for position, (name, samples) in enumerate(combinations):
    keys = jax.random.split(jax.random.fold_in(rng, 1 + position),
                            3 * num_draws).reshape(3, num_draws)

    @jax.jit
    def per_example(params, x, keys, name=name, samples=samples):
      grads = gv.per_draw_gradients(gv.example_objective(MODEL, name, samples),
                                    params, x, keys, jnp.float32(0.0))
      return (estimators.gradient_variance_stats(grads)["per_leaf"]["trace_cov"],
              jax.tree.map(lambda g: jnp.sum(g, 0), grads))

    results = [per_example(params, images[i], keys[i]) for i in range(3)]
    expected_trace = jax.tree.map(lambda *t: sum(t), *[r[0] for r in results])
    expected_sum = jax.tree.map(lambda *t: sum(t), *[r[1] for r in results])
    got = sums[(name, samples)]
    for a, b in zip(jax.tree.leaves(got["trace_cov"]),
                    jax.tree.leaves(expected_trace)):
      np.testing.assert_allclose(a, b, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(got["gradient_sum"]),
                    jax.tree.leaves(expected_sum)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_measure_all_reports_groups_ratios_and_unbiasedness():
  params, images = _setup(batch=4)
  results = gv.measure_all(
      MODEL, params, np.asarray(images), jax.random.key(0),
      estimator_names=(gv.REPARAMETERIZED, gv.SCORE_FUNCTION, gv.LEAVE_ONE_OUT),
      num_samples=(1, 3), num_draws=64, baseline_samples=8)
  # Leave-one-out is skipped at L = 1.
  assert [(m.estimator, m.num_samples) for m in results] == [
      (gv.REPARAMETERIZED, 1), (gv.SCORE_FUNCTION, 1),
      (gv.REPARAMETERIZED, 3), (gv.SCORE_FUNCTION, 3), (gv.LEAVE_ONE_OUT, 3)]
  for m in results:
    assert set(m.variance) == {"mlp/hidden_0", "mean", "log_var", gv.TOTAL}
    groups = sum(v for g, v in m.variance.items() if g != gv.TOTAL)
    assert m.variance[gv.TOTAL] == pytest.approx(groups, rel=1e-6)
    assert m.minibatch_variance[gv.TOTAL] == pytest.approx(
        m.variance[gv.TOTAL] / 4)
    assert math.isfinite(m.snr[gv.TOTAL]) and m.snr[gv.TOTAL] >= 0
    # Unbiased estimators: the mean difference is noise of the expected size.
    assert m.unbiasedness[gv.TOTAL] < 4.0, (m.estimator, m.unbiasedness)
  table = gv.rows(10, results, batch_size=4, num_draws=64)
  assert len(table) == 5 * 4
  ratios = {(r["estimator"], r["num_samples"]): r["ratio_to_reparameterized"]
            for r in table if r["group"] == gv.TOTAL}
  assert ratios[(gv.REPARAMETERIZED, 1)] == 1.0
  assert ratios[(gv.SCORE_FUNCTION, 1)] > 10
  summary = gv.ratio_summary(table)
  assert summary["score_function/L=1"]["steps"] == [10]
  assert summary["score_function/L=1"]["geometric_mean"] == pytest.approx(
      ratios[(gv.SCORE_FUNCTION, 1)])


def test_summarize_debiases_the_signal():
  # Two leaves in one group; B = 2 examples, N = 4 draws.
  sums = {"trace_cov": {"layer": {"kernel": jnp.float32(6.0),
                                  "bias": jnp.float32(2.0)}},
          "gradient_sum": {"layer": {"kernel": jnp.full((2,), 8.0),
                                     "bias": jnp.zeros((1,))}}}
  m = gv.summarize(sums, batch_size=2, num_draws=4, estimator="x",
                   num_samples=1)
  assert m.variance == {"layer": 4.0, gv.TOTAL: 4.0}
  assert m.minibatch_variance["layer"] == 2.0
  assert m.mean_norm["layer"] == pytest.approx(math.sqrt(2.0))  # mean (1, 1, 0)
  # ||g||^2 = 2 - minibatch_variance / N = 1.5.
  assert m.snr["layer"] == pytest.approx(math.sqrt(1.5 / 2.0))


def test_measurement_steps_are_log_spaced_from_zero():
  assert gv.measurement_steps(10_000, 5) == [0, 1, 10, 100, 1000, 10_000]
  assert gv.measurement_steps(30, 1) == [0, 30]
  assert gv.measurement_steps(3, 10) == [0, 1, 2, 3]


def test_leave_one_out_needs_two_samples():
  with pytest.raises(ValueError, match="num_samples >= 2"):
    gv.example_objective(MODEL, gv.LEAVE_ONE_OUT, 1)
  with pytest.raises(ValueError, match="Unknown gradient estimator"):
    gv.example_objective(MODEL, "reinforce", 1)


@pytest.mark.parametrize("field, value, text", [
    ("estimators", ("reinforce",), "variance.estimators"),
    ("num_draws", 1, "num_draws=1"),
    ("num_samples", (0,), "num_samples"),
    ("estimators", ("score_function_leave_one_out",), "L >= 2"),
])
def test_bad_variance_config_is_a_one_line_config_error(field, value, text):
  config = gv_config.get_config("smoke")
  if field == "estimators" and value == ("score_function_leave_one_out",):
    config.variance.num_samples = (1,)
  config.variance[field] = value
  with pytest.raises(config_utils.ConfigError) as info:
    gv.validate(config)
  assert text in str(info.value)
  assert "\n" not in str(info.value)


def test_config_variants():
  for arg in ("smoke", "cpu", "paper", None):
    config = gv_config.get_config(arg)
    assert isinstance(config.variance, ml_collections.ConfigDict)
    config_utils.validate_config(config, num_devices=1)
    gv.validate(config)
  with pytest.raises(config_utils.ConfigError, match="not several"):
    gv_config.get_config("smoke,paper")


# ----------------------------------------------------------------------------
# The entry point.


def test_smoke_run_writes_csv_png_and_summary(cli_runs):
  returncode, workdir, log = _finished(cli_runs, "smoke")
  assert returncode == 0, log[-3000:]
  assert "Traceback" not in log
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["steps"] == 30
  assert summary["measured_steps"] == [0, 1, 5, 30]
  ratio = summary["variance_ratio_to_reparameterized"]["score_function/L=2"]
  assert ratio["steps"] == [0, 1, 5, 30]
  assert ratio["min"] > 1.0  # the score-function estimator is noisier

  with open(workdir / "gradient_variance.csv") as f:
    table = list(csv.DictReader(f))
  # 4 steps x 4 estimators x (3 layers + total).
  assert len(table) == 4 * 4 * 4
  assert {r["group"] for r in table} == {"mlp/hidden_0", "mean", "log_var",
                                          "total"}
  assert all(math.isfinite(float(r["variance"])) for r in table)
  image = matplotlib.image.imread(workdir / "gradient_variance.png")
  assert image.shape[0] > 100 and image.shape[1] > 300
  assert (workdir / "checkpoints").is_dir()
