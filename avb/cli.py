"""The shared absl main of the training experiments.

Every expected failure (a bad config value, missing or malformed data, a
non-finite loss) ends the process with one line on stderr naming the problem
and its fix, and exit status 1; never a traceback from inside JAX.
"""

from __future__ import annotations

import logging as logging_std
import os
import re
import signal
import sys
from typing import Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from avb import config_utils

_EXPECTED_ERRORS: tuple[type[Exception], ...] = (config_utils.ConfigError,)


def _expected_errors() -> tuple[type[Exception], ...]:
  from avb import data  # pylint: disable=g-import-not-at-top
  from avb import train  # pylint: disable=g-import-not-at-top
  return _EXPECTED_ERRORS + (data.DataError, train.NonFiniteError)


def _raise_keyboard_interrupt(signum, frame) -> None:
  del signum, frame
  raise KeyboardInterrupt("SIGTERM")


def fail(message: str) -> None:
  """Prints `error: message` on one line to stderr and exits with status 1."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(1)


def run(default_config: str, experiment: Callable[..., object],
        validate: Callable[..., None] | None = None) -> None:
  """Defines --config and --workdir and runs `experiment(config, workdir)`.

  Args:
    default_config: path of the config file used when --config is not given.
    experiment: e.g. `avb.train.train_and_evaluate`.
    validate: `validate(config, num_devices=..., num_processes=...)`, raising
      `config_utils.ConfigError` on a bad field, called before any data or
      device work; default `config_utils.validate_config` (the AEVB
      sections). Entry points with other sections (dSprites) pass theirs.
  """
  config_flag = config_flags.DEFINE_config_file(
      "config", default_config, "Experiment config file (path[:args]).",
      lock_config=True)
  workdir_flag = flags.DEFINE_string(
      "workdir", None, "Directory for checkpoints, logs, images, summary.json.")

  def main(argv):
    if len(argv) > 1:
      fail(f"unexpected arguments {argv[1:]}; use --config=... --workdir=...")
    try:
      config = config_flag.value
      # Cheap checks first: a bad value is reported before TensorFlow (slow
      # to import) or any data is touched.
      # Join a multi-process run first: nothing may touch a device before.
      from avb import distributed  # pylint: disable=g-import-not-at-top
      distributed.initialize(config)
      import jax  # pylint: disable=g-import-not-at-top
      (validate or config_utils.validate_config)(
          config, num_devices=jax.device_count(),
          num_processes=jax.process_count())
      config_utils.check_workdir(workdir_flag.value)
      # A preempted or killed job (SIGTERM) saves a checkpoint like Ctrl-C.
      signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
      experiment(config, workdir_flag.value)
    except _expected_errors() as e:
      fail(str(e))  # One `error:` line, not also a log record.

  # Parse the flags here rather than inside app.run, which would print a
  # traceback for an error raised by get_config or a locked-config override.
  try:
    _check_config_file(sys.argv, default_config)
    argv = flags.FLAGS(sys.argv)
  except Exception as e:  # pylint: disable=broad-except
    fail(_flag_error_line(e, sys.argv))
  _quiet_library_logs(flags.FLAGS.verbosity)
  app.run(main, flags_parser=lambda _: argv)


def _check_config_file(argv: list[str], default_config: str) -> None:
  paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  path = (paths[-1] if paths else default_config).split(":", 1)[0]
  if not os.path.isfile(path):
    raise config_utils.ConfigError(
        f"config file {path!r} not found; run from the repository root with "
        "e.g. --config=experiments/configs/mnist.py")


def _flag_error_line(error: Exception, argv: list[str]) -> str:
  """Turns a flag-parsing error (absl, ml_collections) into one line with the fix."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  for e in chain:
    if isinstance(e, config_utils.ConfigError):
      # ml_collections re-raises get_config's error with the traceback in
      # its message; the original message is what follows the last type name.
      return str(e).rsplit("ConfigError: ", 1)[-1].strip()
  text = str(chain[0])
  unknown = re.search(r"Unknown command line flag '(config\.[\w.]+)'", text)
  if unknown:
    field = unknown.group(1)
  elif any(isinstance(e, (KeyError, AttributeError)) for e in chain):
    match = re.search(r"'(\w+)'", str(chain[-1]))
    name = match.group(1) if match else ""
    bad = [a.split("=")[0].lstrip("-") for a in argv if a.startswith("--config.")
           and name in a.split("=")[0].split(".")]
    field = bad[0] if bad else name
  else:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(chain[0]).__name__
  return (f"unknown config field --{field}: the config is locked; check the "
          "name against the config file")


class _DropLibraryNoise(logging_std.Filter):
  """Drops library records that say nothing about the run.

  - orbax logs a dozen INFO lines per checkpoint (its warnings stay);
  - matplotlib warns once per machine that it is building its font cache.
  """

  def filter(self, record: logging_std.LogRecord) -> bool:
    if record.levelno < logging_std.WARNING and "orbax" in record.pathname:
      return False
    return "building the font cache" not in record.getMessage()


def _quiet_library_logs(verbosity: int) -> None:
  """Keeps a normal run's console to avb's own lines; --verbosity=1 shows all.

  JAX logs at INFO that it probed for a TPU and found no libtpu, which every
  CPU or GPU run would print; its warnings still show. A logger's filter sees
  only the records logged on that very logger, not those its children pass
  up, so each filter goes on the logger that emits: orbax logs through
  absl's logger, matplotlib's notice comes from `matplotlib.font_manager`.
  """
  if verbosity >= 1:
    return
  logging_std.getLogger("jax").setLevel(logging_std.WARNING)
  noise = _DropLibraryNoise()
  logging_std.getLogger("absl").addFilter(noise)
  logging_std.getLogger("matplotlib.font_manager").addFilter(noise)
