"""Tests for avb/config_utils.py and the experiment configs that use it.

Every bad value must fail with a `ConfigError` whose message is one line that
names the field and the value, before any data is read or anything compiled.
"""

import os
import pathlib

import pytest

from avb import config_utils
from experiments.configs import frey_face
from experiments.configs import mnist

ConfigError = config_utils.ConfigError
NUM_DEVICES = 8
CONFIG_MODULES = {"mnist": mnist, "frey_face": frey_face}


def _error(config, num_devices=NUM_DEVICES) -> str:
  """Validates `config`, expecting a ConfigError; returns its message."""
  with pytest.raises(ConfigError) as info:
    config_utils.validate_config(config, num_devices=num_devices)
  message = str(info.value)
  assert "\n" not in message, message
  return message


def _smoke_config():
  """A config that passes validation on 8 devices, unlocked for edits."""
  config = mnist.get_config("smoke")
  config.unlock()
  return config


# ----------------------------------------------------------------------------
# parse_arg.


def test_parse_arg_sets_value_and_bare_flag():
  args = config_utils.parse_arg("latent_dim=3,smoke", latent_dim=20,
                                smoke=False, paper=False)
  assert args.latent_dim == 3
  assert isinstance(args.latent_dim, int)
  assert args.smoke is True
  assert args.paper is False


def test_parse_arg_converts_to_the_default_type():
  args = config_utils.parse_arg(" rate=0.5 , name=x , flag=false ",
                                rate=1.0, name="y", flag=True)
  assert args.rate == 0.5
  assert args.name == "x"
  assert args.flag is False


@pytest.mark.parametrize("arg", [None, "", ",", " "])
def test_parse_arg_empty_gives_defaults(arg):
  args = config_utils.parse_arg(arg, latent_dim=20, smoke=False)
  assert args.to_dict() == {"latent_dim": 20, "smoke": False}


def test_parse_arg_unknown_key_names_it_and_lists_allowed():
  with pytest.raises(ConfigError) as info:
    config_utils.parse_arg("smok", latent_dim=20, smoke=False)
  message = str(info.value)
  assert "'smok'" in message
  assert "latent_dim" in message and "smoke" in message


@pytest.mark.parametrize("arg", ["latent_dim=three", "latent_dim=2.5",
                                 "latent_dim=", "smoke=maybe"])
def test_parse_arg_bad_value(arg):
  with pytest.raises(ConfigError, match=arg.split("=")[0]):
    config_utils.parse_arg(arg, latent_dim=20, smoke=False)


def test_parse_arg_bare_key_of_non_bool_needs_a_value():
  with pytest.raises(ConfigError, match="latent_dim"):
    config_utils.parse_arg("latent_dim", latent_dim=20, smoke=False)


# ----------------------------------------------------------------------------
# The experiment configs.


@pytest.mark.parametrize("name, likelihood, hidden, latents, rate", [
    ("mnist", "bernoulli", 500, 20, 0.02),
    ("frey_face", "gaussian", 200, 10, 0.01),
])
def test_default_config_is_the_papers_model(name, likelihood, hidden, latents,
                                            rate):
  config = CONFIG_MODULES[name].get_config()
  assert config.data.name == name
  assert config.model.likelihood == likelihood
  assert tuple(config.model.hidden_sizes) == (hidden,)
  assert config.model.num_latents == latents
  assert config.optimizer.name == "adagrad"
  assert config.optimizer.learning_rate == rate
  assert config.training.batch_size == 100
  assert config.objective.estimator == "B"
  assert config.objective.num_samples == 1
  # The default batch of 100 is for real devices: it does not split over 8.
  config_utils.validate_config(config, num_devices=1)
  config_utils.validate_config(config, num_devices=4)


@pytest.mark.parametrize("name, rate", [("mnist", 0.02), ("frey_face", 0.01)])
def test_paper_config_evaluates_1e8_examples(name, rate):
  config = CONFIG_MODULES[name].get_config("paper")
  assert config.training.num_steps * config.training.batch_size == 10**8
  assert config.training.batch_size == 100
  assert config.optimizer.name == "adagrad"
  assert config.optimizer.learning_rate == rate
  config_utils.validate_config(config, num_devices=4)


@pytest.mark.parametrize("name", ["mnist", "frey_face"])
def test_smoke_config_is_small_and_valid_on_8_devices(name):
  config = CONFIG_MODULES[name].get_config("smoke")
  default = CONFIG_MODULES[name].get_config()
  assert config.training.num_steps <= 100
  assert config.data.train_size <= 1000 and config.data.test_size <= 1000
  assert max(config.model.hidden_sizes) < max(default.model.hidden_sizes)
  assert (config.eval.log_likelihood_samples
          < default.eval.log_likelihood_samples)
  assert config.model.likelihood == default.model.likelihood
  config_utils.validate_config(config, num_devices=NUM_DEVICES)


@pytest.mark.parametrize("name", ["mnist", "frey_face"])
def test_latent_dim_argument(name):
  assert CONFIG_MODULES[name].get_config("latent_dim=3").model.num_latents == 3
  config = CONFIG_MODULES[name].get_config("latent_dim=3,smoke")
  assert config.model.num_latents == 3
  assert config.training.num_steps == CONFIG_MODULES[name].get_config(
      "smoke").training.num_steps


@pytest.mark.parametrize("name", ["mnist", "frey_face"])
def test_config_is_locked(name):
  config = CONFIG_MODULES[name].get_config()
  with pytest.raises(AttributeError):
    config.model.bogus = 1
  with pytest.raises(AttributeError):
    config.bogus = 1
  config.model.num_latents = 5  # Existing fields can still be overridden.
  assert config.model.num_latents == 5


@pytest.mark.parametrize("name", ["mnist", "frey_face"])
def test_smoke_and_paper_together_is_an_error(name):
  with pytest.raises(ConfigError, match="smoke.*paper"):
    CONFIG_MODULES[name].get_config("smoke,paper")


@pytest.mark.parametrize("name", ["mnist", "frey_face"])
def test_unknown_config_argument_is_an_error(name):
  with pytest.raises(ConfigError, match="'smok'.*allowed.*smoke"):
    CONFIG_MODULES[name].get_config("smok")


# ----------------------------------------------------------------------------
# validate_config.


@pytest.mark.parametrize("section, field, value", [
    ("model", "num_latents", 0),
    ("model", "num_latents", -2),
    ("model", "activation", "swishy"),
    ("model", "likelihood", "poisson"),
    ("model", "hidden_sizes", ()),
    ("model", "hidden_sizes", (32, 0)),
    ("data", "name", "cifar"),
    ("data", "source", "ftp"),
    ("data", "train_size", 0),
    ("objective", "estimator", "C"),
    ("objective", "num_samples", 0),
    ("optimizer", "name", "lbfgs"),
    ("optimizer", "learning_rate", 0.0),
    ("optimizer", "learning_rate", -0.01),
    ("training", "batch_size", 0),
    ("training", "batch_size", -8),
    ("training", "num_steps", 0),
    ("eval", "batch_size", 0),
    ("eval", "batch_size", 100),
    ("eval", "num_samples", 0),
    ("eval", "log_likelihood_samples", -1),
    # Each of these used to pass validation and crash later (a traceback
    # after training, or from int() inside the validator).
    ("model", "hidden_sizes", ("a",)),
    ("eval", "train_examples", 0),
    ("eval", "log_likelihood_examples", 0),
    ("training", "max_checkpoints_to_keep", 0),
])
def test_bad_value_names_field_and_value(section, field, value):
  config = _smoke_config()
  config[section][field] = value
  message = _error(config)
  assert f"{section}.{field}" in message
  assert repr(value) in message


def test_batch_size_not_divisible_suggests_a_multiple():
  config = _smoke_config()
  config.training.batch_size = 100
  message = _error(config, num_devices=8)
  assert "training.batch_size=100" in message
  assert "multiple of 8" in message
  suggestion = int(message.rsplit("e.g. ", 1)[1].split()[0].strip(".,;"))
  assert suggestion > 0 and suggestion % 8 == 0


def test_batch_size_smaller_than_devices_suggests_a_multiple():
  config = _smoke_config()
  config.training.batch_size = 4
  message = _error(config, num_devices=8)
  assert "e.g. 8" in message


def test_eval_batch_size_not_divisible_names_devices():
  config = _smoke_config()
  config.eval.batch_size = 36
  message = _error(config, num_devices=8)
  assert "eval.batch_size=36" in message and "8" in message


@pytest.mark.parametrize("num_devices", [1, 2, 4, 8])
def test_valid_config_passes(num_devices):
  for module in (mnist, frey_face):
    config_utils.validate_config(module.get_config("smoke"),
                                 num_devices=num_devices)


def test_optional_values_are_allowed():
  config = _smoke_config()
  config.eval.log_likelihood_samples = 0  # Skips the log-likelihood.
  config.eval.log_likelihood_examples = None  # The whole test split.
  config.training.max_checkpoints_to_keep = None  # Keep every checkpoint.
  config.data.train_size = None
  config_utils.validate_config(config, num_devices=NUM_DEVICES)


# ----------------------------------------------------------------------------
# check_workdir.


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("not a directory")
  with pytest.raises(ConfigError, match="is a file") as info:
    config_utils.check_workdir(str(path))
  assert str(path) in str(info.value)


def test_workdir_that_cannot_be_created(tmp_path):
  # A path under a file cannot be created, even by root (who bypasses
  # permission bits, so a chmod-ed directory would not test anything).
  parent = tmp_path / "a_file"
  parent.write_text("")
  workdir = parent / "run"
  with pytest.raises(ConfigError, match="cannot be created") as info:
    config_utils.check_workdir(str(workdir))
  assert str(workdir) in str(info.value)
  assert "\n" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses permission bits")
def test_workdir_not_writable(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    with pytest.raises(ConfigError, match="not writable"):
      config_utils.check_workdir(str(locked))
  finally:
    locked.chmod(0o700)


def test_new_nested_workdir_is_created(tmp_path):
  workdir = tmp_path / "runs" / "mnist" / "z3"
  path = config_utils.check_workdir(str(workdir))
  assert workdir.is_dir()
  assert path == workdir.resolve()
  assert isinstance(path, pathlib.Path)
  # An existing directory is fine too.
  assert config_utils.check_workdir(str(workdir)) == path


@pytest.mark.parametrize("workdir", [None, ""])
def test_missing_workdir(workdir):
  with pytest.raises(ConfigError, match="--workdir is required"):
    config_utils.check_workdir(workdir)


# ----------------------------------------------------------------------------
# Sweeps, processes, variants.


@pytest.mark.parametrize("axis, grid, expected", [
    ("seed", (), "must list at least one value"),
    ("beta", (1.0,), "allowed: seed, optimizer.learning_rate, objective.weight_prior_std"),
    ("seed", (0.5,), "seeds must be integers"),
    ("optimizer.learning_rate", (0.1, -1.0), "learning rates must be > 0"),
    ("seed", (1, 1), "must not repeat a value"),
    ("seed", ("a",), "must be numbers"),
])
def test_bad_sweep_is_one_line(axis, grid, expected):
  config = _smoke_config()
  config.sweep.axis = axis
  config.sweep.grid = grid
  assert expected in _error(config)


def test_valid_sweep_passes():
  config = _smoke_config()
  config.sweep.axis = "objective.weight_prior_std"
  config.sweep.grid = (0.0, 1.0)
  config_utils.validate_config(config, num_devices=8)


def test_batch_not_divisible_by_processes():
  config = _smoke_config()
  config.training.batch_size = 6
  with pytest.raises(ConfigError, match="divisible by the 4 processes"):
    config_utils.validate_config(config, num_devices=2, num_processes=4)


@pytest.mark.parametrize("name", ["mnist", "frey_face"])
def test_tpu_variant_is_the_paper_budget_in_big_batches(name):
  config = CONFIG_MODULES[name].get_config("tpu")
  assert config.training.batch_size * config.training.num_steps == 10**8
  assert config.training.steps_per_call >= 100
  config_utils.validate_config(config, num_devices=8)
  with pytest.raises(ConfigError, match="choose one of"):
    CONFIG_MODULES[name].get_config("tpu,smoke")


def test_posterior_names_match_the_families_module():
  from avb import families  # pylint: disable=g-import-not-at-top
  assert config_utils.POSTERIORS == tuple(families.FAMILIES)
  assert config_utils.NO_CLOSED_FORM_KL == tuple(
      name for name, f in families.FAMILIES.items() if not f.has_closed_form_kl)


def test_estimator_b_without_closed_form_kl_says_use_a():
  config = _smoke_config()
  config.model.posterior = "logistic"
  assert "use estimator A" in _error(config)
