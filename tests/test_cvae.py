"""Tests for avb/cvae.py and the experiments/cvae.py entry point.

The pieces are checked in-process on tiny models: the condition region (and
its one-line errors), the split of an image into (x, c), the shapes of the
CVAE and the regressor, the importance-sampled log p(x|c) against the ELBO,
and, on a toy task with two equally likely completions, that the CVAE learns
both while the regressor averages them. One `smoke` run and one bad region
go through the real command line as subprocesses, started first so that
they run beside the in-process tests.
"""

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
import optax
import pytest

from avb import config_utils
from avb import cvae
from experiments.configs import cvae as cvae_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
    os.environ.get("AVB_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
  """Starts the smoke run and a bad-region run; yields name -> (process, workdir, log)."""
  root = tmp_path_factory.mktemp("cvae_cli")
  env = dict(os.environ)
  if SHARED_DATA.is_dir():
    env.setdefault("AVB_DATA_DIR", str(SHARED_DATA))
  commands = {
      "smoke": [],
      "empty_region": ["--config.condition.region=box",
                       "--config.condition.rows=(5,5)"],
  }
  started = {}
  for name, extra in commands.items():
    workdir = root / name
    log = open(root / f"{name}.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.cvae",
         "--config=experiments/configs/cvae.py:smoke", f"--workdir={workdir}",
         *extra],
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


def _condition(region, rows=(0, 14), cols=(0, 28)):
  return ml_collections.ConfigDict({"region": region, "rows": rows, "cols": cols})


# ----------------------------------------------------------------------------
# The condition region.


@pytest.mark.parametrize("region, expected", [
    ("top_half", ((0, 14), (0, 28))),
    ("bottom_half", ((14, 28), (0, 28))),
    ("left_half", ((0, 28), (0, 14))),
    ("right_half", ((0, 28), (14, 28))),
    ("centre_columns", ((0, 28), (12, 16))),
    ("centre_patch", ((7, 21), (7, 21))),
])
def test_named_regions(region, expected):
  assert cvae.region_box(_condition(region), (28, 28)) == expected


def test_box_region():
  assert cvae.region_box(_condition("box", (2, 9), (3, 4)), (28, 28)) == (
      (2, 9), (3, 4))


@pytest.mark.parametrize("rows, cols, text", [
    ((5, 5), (0, 28), "covers nothing"),
    ((0, 28), (7, 7), "covers nothing"),
    ((0, 28), (0, 28), "covers the whole 28x28 image"),
    ((0, 30), (0, 10), "0 <= start <= stop <= 28"),
    ((9, 3), (0, 10), "0 <= start <= stop <= 28"),
])
def test_bad_box_is_a_one_line_config_error_with_the_fix(rows, cols, text):
  with pytest.raises(config_utils.ConfigError) as info:
    cvae.region_box(_condition("box", rows, cols), (28, 28))
  message = str(info.value)
  assert text in message
  assert "\n" not in message
  assert "e.g." in message  # the fix


def test_unknown_region_is_a_config_error():
  with pytest.raises(config_utils.ConfigError, match="allowed: top_half"):
    cvae.region_box(_condition("middle"), (28, 28))


def test_validate_rejects_non_bernoulli_and_non_mnist():
  config = cvae_config.get_config("smoke")
  config.model.likelihood = "gaussian"
  with pytest.raises(config_utils.ConfigError, match="bernoulli"):
    cvae.validate(config)
  config = cvae_config.get_config("smoke")
  config.data.name = "frey_face"
  with pytest.raises(config_utils.ConfigError, match="frey_face"):
    cvae.validate(config)


def test_config_variants_are_valid():
  for arg in ("smoke", "cpu", "paper", None, "region=top_half"):
    config = cvae_config.get_config(arg)
    config_utils.validate_config(config, num_devices=1)
    cvae.validate(config)
  assert cvae_config.get_config(None).condition.region == "centre_columns"


# ----------------------------------------------------------------------------
# Models.


SMALL = cvae.CVAEConfig(image_shape=(6, 5), rows=(0, 3), cols=(0, 5),
                        num_latents=3, hidden_sizes=(16,),
                        regressor_hidden_sizes=(8,))


def test_split_and_join_are_inverse():
  images = jnp.arange(2 * 30, dtype=jnp.float32).reshape(2, 30)
  x, c = cvae.split_image(SMALL, images)
  assert x.shape == (2, 15) and c.shape == (2, 15)
  # The observed rows 0..2 are the first 15 pixels of a 6x5 image.
  np.testing.assert_array_equal(c, images[:, :15])
  np.testing.assert_array_equal(cvae.join_image(SMALL, x, c), images)
  assert sorted(np.concatenate([SMALL.observed_indices,
                                SMALL.hidden_indices])) == list(range(30))


def test_shapes():
  params = cvae.init_params(SMALL, jax.random.key(0))
  images = np.random.default_rng(1).random((4, 30), dtype=np.float32)
  x, c = cvae.split_image(SMALL, images)
  model = cvae.ConditionalVAE(SMALL)
  mean, log_var = model.apply({"params": params["cvae"]}, x, c,
                              method=cvae.ConditionalVAE.encode)
  assert mean.shape == log_var.shape == (4, 3)
  z = jnp.zeros((7, 4, 3))
  logits = model.apply({"params": params["cvae"]}, z, c,
                       method=cvae.ConditionalVAE.decode)
  assert logits.shape == (7, 4, 15)
  assert cvae.regressor_logits(SMALL, params["regressor"], c).shape == (4, 15)
  terms = cvae.cvae_elbo_terms(SMALL, params["cvae"], x, c, jax.random.key(2), 5)
  assert terms["elbo"].shape == (4,) and terms["z"].shape == (5, 4, 3)
  samples = cvae.sample_completions(SMALL, params["cvae"], c, jax.random.key(3), 6)
  assert samples.shape == (6, 4, 15)
  assert float(jnp.min(samples)) >= 0 and float(jnp.max(samples)) <= 1
  assert cvae.regressor_log_likelihood(SMALL, params["regressor"], x, c).shape == (4,)


@pytest.mark.slow
def test_importance_log_likelihood_is_at_least_the_elbo():
  params = cvae.init_params(SMALL, jax.random.key(0))
  images = (jax.random.uniform(jax.random.key(1), (16, 30)) < 0.3).astype(jnp.float32)
  x, c = cvae.split_image(SMALL, images)

  @jax.jit
  def estimates(params):
    elbo = cvae.cvae_elbo_terms(SMALL, params, x, c, jax.random.key(2),
                                2000)["elbo"]
    log_likelihood = cvae.cvae_log_likelihood(SMALL, params, x, c,
                                              jax.random.key(3), 2000, 500)
    one_sample = jnp.mean(jax.vmap(lambda k: cvae.cvae_log_likelihood(
        SMALL, params, x, c, k, 1, 1))(
            jax.random.split(jax.random.key(4), 2000)), axis=0)
    return elbo, log_likelihood, one_sample

  elbo, log_likelihood, one_sample = estimates(params["cvae"])
  assert log_likelihood.shape == (16,)
  # log p(x|c) >= ELBO for every example; the Monte Carlo error of both at
  # 2,000 samples is far below the tolerance.
  assert bool(jnp.all(log_likelihood >= elbo - 0.05)), (log_likelihood, elbo)
  # With one sample the importance estimate is an unbiased ELBO estimate.
  np.testing.assert_allclose(one_sample, elbo, atol=0.1)


@pytest.mark.slow
def test_cvae_learns_two_completions_where_the_regressor_averages():
  # c is always blank; x (the bottom half of a 4x4 image) is one of two
  # patterns with equal probability. The best regressor predicts 0.5
  # everywhere: log p(x|c) = 8 log(1/2) = -5.5 nats. A CVAE can reach
  # log(1/2) = -0.7 nats by putting one pattern on each side of z.
  config = cvae.CVAEConfig(image_shape=(4, 4), rows=(0, 2), cols=(0, 4),
                           num_latents=1, hidden_sizes=(32,),
                           regressor_hidden_sizes=(16,))
  patterns = np.zeros((2, 16), np.float32)
  patterns[0, 8:12] = 1.0
  patterns[1, 12:16] = 1.0
  data = jnp.asarray(patterns[np.random.default_rng(0).integers(0, 2, 512)])
  params = cvae.init_params(config, jax.random.key(0))
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, i):
    batch = jax.lax.dynamic_slice_in_dim(data, (i % 8) * 64, 64)
    grads = jax.grad(lambda p: cvae.loss_fn(
        p, batch, jax.random.fold_in(jax.random.key(1), i), {},
        config=config)[0])(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  for i in range(400):
    params, opt_state = step(params, opt_state, i)
  x, c = cvae.split_image(config, jnp.asarray(patterns))
  regressor = cvae.regressor_log_likelihood(config, params["regressor"], x, c)
  conditional = cvae.cvae_log_likelihood(config, params["cvae"], x, c,
                                         jax.random.key(2), 500)
  assert float(jnp.mean(regressor)) < -5.0
  assert float(jnp.mean(conditional)) > -2.0
  samples = cvae.sample_completions(config, params["cvae"], c[:1],
                                    jax.random.key(3), 200)[:, 0]  # [S, 8]
  closest = jnp.argmin(jnp.sum(jnp.square(samples[:, None] - x[None]), -1), 1)
  # Both completions appear among the samples.
  assert 0.2 < float(jnp.mean(closest)) < 0.8
  stats = cvae.completion_statistics(config, params, np.asarray(patterns),
                                     jax.random.key(4), 50)
  assert stats["cvae_best_of_samples_mse"] < stats["regressor_mse"]
  assert stats["sample_spread"] > 0.2


def test_figure_inputs_take_one_image_per_class_first():
  labels = np.array([3, 3, 1, 0, 1, 2], np.int32)
  images = np.zeros((6, 4), np.float32)
  assert list(cvae.figure_inputs(images, labels, 5)) == [3, 2, 5, 0, 1]
  assert list(cvae.figure_inputs(images, None, 2)) == [0, 1]


def test_plot_completions_writes_a_png(tmp_path):
  images = np.random.default_rng(0).random((2, 30)).astype(np.float32)
  path = tmp_path / "figure.png"
  cvae.plot_completions(path, SMALL, images, np.zeros((2, 15)),
                        np.ones((3, 2, 15)), title="test")
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 50


# ----------------------------------------------------------------------------
# The entry point.


def test_smoke_run_writes_figure_and_summary(cli_runs):
  returncode, workdir, log = _finished(cli_runs, "smoke")
  assert returncode == 0, log[-3000:]
  assert "Traceback" not in log
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["steps"] == 30
  assert summary["condition_region"] == "centre_columns"
  assert summary["num_observed_pixels"] == 28 * 4
  ll = summary["log_likelihood"]
  for key in ("cvae_log_likelihood", "regressor_log_likelihood", "cvae_elbo",
              "cvae_minus_regressor"):
    assert math.isfinite(ll[key]), (key, ll)
  assert ll["count"] == 80
  # The importance estimate bounds the ELBO from above (on average).
  assert ll["cvae_log_likelihood"] >= ll["cvae_elbo"] - 1.0
  assert ll["cvae_minus_regressor"] == pytest.approx(
      ll["cvae_log_likelihood"] - ll["regressor_log_likelihood"], abs=1e-3)
  image = matplotlib.image.imread(workdir / "cvae_completions.png")
  assert image.shape[0] > 100
  records = [json.loads(line) for line in
             (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["split"] == "train"] == [10, 20, 30]
  assert any(r["split"] == "test" and r["step"] == 20 for r in records)
  assert (workdir / "checkpoints" / "30").is_dir()


def test_region_that_covers_nothing_is_one_error_line(cli_runs):
  returncode, _, log = _finished(cli_runs, "empty_region")
  assert returncode == 1
  assert "Traceback" not in log
  last = [line for line in log.splitlines() if line.strip()][-1]
  assert last.startswith("error: ") and "covers nothing" in last, last
