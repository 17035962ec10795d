"""Tests of avb/writers.py's console lines and of evaluate()'s progress lines."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avb import train
from avb import writers


@pytest.mark.parametrize("seconds, text", [
    (0.4, "0s"), (42, "42s"), (185, "3m05s"), (7620, "2h07m"),
    (float("inf"), "?"), (-3, "0s")])
def test_format_duration(seconds, text):
  assert writers.format_duration(seconds) == text


def test_console_line_shows_progress_and_the_main_numbers_only():
  metrics = {"loss": 135.214, "elbo": -134.9, "kl": 20.5,
             "reconstruction": -114.4, "kl_per_latent": np.ones(20),
             "examples_per_sec": 24_351.0, "eta_seconds": 192.0,
             "l2_grads": 3.0}
  line = writers.console_line(500, metrics, "train", num_steps=10_000)
  assert line == ("step 500/10,000 (5%) | 24.4k ex/s | ETA 3m12s | "
                  "loss 135.21 | elbo -134.90 | kl 20.50")
  test = writers.console_line(500, {"elbo": -130.0}, "test", num_steps=10_000,
                              label="seed=1")
  assert test == "[seed=1] | step 500/10,000 (5%) | test elbo -130.00"


def test_console_line_is_capped():
  metrics = {name: 1.0 for name in ("loss", "elbo", "kl", "capacity",
                                    "log_likelihood")}
  line = writers.console_line(10**9, metrics, "a_very_long_split_name" * 3,
                              num_steps=10**10, label="x" * 40)
  assert len(line) == writers.MAX_CONSOLE_CHARS and line.endswith("...")


def test_evaluate_reports_progress_on_long_evaluations(caplog):
  mesh = train.make_mesh(jax.devices()[:1])
  _, sharded = train.shardings(mesh)

  @jax.jit
  def count(params, x, mask, rng, batch_index):
    del params, x, rng, batch_index
    return {"count": jnp.sum(mask)}

  images = np.zeros((50, 2, 2), np.float32)
  with caplog.at_level(logging.INFO):
    totals = train.evaluate(count, {}, images, 10, jax.random.key(0), sharded,
                            progress="test thing", progress_every_s=0.0)
    silent = train.evaluate(count, {}, images, 10, jax.random.key(0), sharded)
  assert float(totals["count"]) == float(silent["count"]) == 50
  lines = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith("test thing: ")]
  assert lines and all("/50 images, ETA " in line for line in lines), lines


def test_quiet_logs_drop_the_font_cache_notice_but_keep_real_warnings(
    caplog, monkeypatch):
  from avb import cli  # pylint: disable=g-import-not-at-top
  font_manager = logging.getLogger("matplotlib.font_manager")
  jax_logger = logging.getLogger("jax")
  monkeypatch.setattr(font_manager, "filters", list(font_manager.filters))
  monkeypatch.setattr(jax_logger, "level", jax_logger.level)
  absl_logger = logging.getLogger("absl")
  monkeypatch.setattr(absl_logger, "filters", list(absl_logger.filters))
  cli._quiet_library_logs(verbosity=0)  # pylint: disable=protected-access
  with caplog.at_level(logging.INFO):
    # As matplotlib words it, on the logger it uses.
    font_manager.warning("Matplotlib is building the font cache; this may "
                         "take a moment.")
    font_manager.warning("findfont: Font family 'Nope' not found.")
    jax_logger.info("Unable to initialize backend 'tpu'")
    jax_logger.warning("a real JAX warning")
  messages = [r.getMessage() for r in caplog.records]
  assert messages == ["findfont: Font family 'Nope' not found.",
                      "a real JAX warning"], messages
