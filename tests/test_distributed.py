"""Multi-process training, proven on one machine.

The end-to-end test starts two processes with 4 CPU devices each (JAX's CPU
collectives over localhost) and checks that they train exactly what one
process with 8 devices trains. The others check the join that guards
`jax.distributed.initialize`: a missing coordinator or process, or processes
with different configs, each give a one-line error instead of a C++ abort.
"""

import os
import pathlib
import socket
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from avb import config_utils
from avb import data
from avb import distributed
from avb import train
from experiments.configs import mnist as mnist_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _overrides():
  """A short smoke run; every process gets the same config."""
  return {"training.num_steps": 12, "training.log_every": 6,
          "training.eval_every": 100, "training.checkpoint_every": 6,
          "training.steps_per_call": 3, "eval.log_likelihood_samples": 0,
          "eval.num_images": 4}


def _config():
  config = mnist_config.get_config("smoke")
  with config.unlocked():
    for key, value in _overrides().items():
      section, field = key.split(".")
      config[section][field] = value
  return config


def _params(workdir: pathlib.Path, like=None):
  """The last checkpoint's params; `like` restores one written elsewhere."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = train.checkpoint_manager(workdir, 2)
  step = manager.latest_step()
  if like is None:
    restored = manager.restore(step)
  else:
    # Written by 2 processes: restore onto this process's devices.
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return restored, step


@pytest.mark.slow
def test_two_processes_train_what_one_process_with_eight_devices_trains(
    tmp_path, monkeypatch):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             AVB_COORDINATOR=f"localhost:{port}", AVB_NUM_PROCESSES="2",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  command = [sys.executable, "-m", "experiments.mnist",
             "--config=experiments/configs/mnist.py:smoke",
             f"--workdir={tmp_path / 'two'}"]
  command += [f"--config.{k}={v}" for k, v in _overrides().items()]
  procs = [subprocess.Popen(command, cwd=REPO,
                            env=dict(env, AVB_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
           for i in range(2)]
  # Meanwhile, the same run in this process, on its 8 devices.
  monkeypatch.setattr(data, "network_available", lambda *a, **k: False)
  reference = train.train_and_evaluate(_config(), str(tmp_path / "one"))
  outputs = []
  for proc in procs:
    out, _ = proc.communicate(timeout=120)
    outputs.append(out)
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-3000:]

  state_one, step_one = _params(tmp_path / "one")
  state_two, step_two = _params(tmp_path / "two", like=state_one)
  params_one, params_two = state_one["params"], state_two["params"]
  assert step_one == step_two == 12
  for a, b in zip(jax.tree.leaves(params_one), jax.tree.leaves(params_two)):
    # Equal up to the order of the float sums in the gradient all-reduce
    # (across processes it is gloo's), which Adagrad amplifies a little.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
  import json  # pylint: disable=g-import-not-at-top
  summary = json.loads((tmp_path / "two" / "summary.json").read_text())
  assert summary["num_train"] == reference["num_train"]
  # The KL term is closed-form; the reconstruction term's noise is drawn per
  # evaluation batch, whose composition depends on the process layout.
  np.testing.assert_allclose(summary["test_kl"], reference["test_kl"], rtol=1e-4)
  np.testing.assert_allclose(summary["test_elbo"], reference["test_elbo"],
                             rtol=2e-3)
  # Only process 0 wrote logs and images.
  assert (tmp_path / "two" / "metrics.jsonl").exists()
  assert len(list((tmp_path / "two").glob("events.out.tfevents.*"))) == 1


def _settings(**fields):
  config = _config()
  with config.unlocked():
    config.distributed.enabled = True
    for key, value in fields.items():
      config.distributed[key] = value
  return config


def test_unreachable_coordinator_times_out_with_one_line():
  port = _free_port()
  config = _settings(coordinator_address=f"localhost:{port}", num_processes=2,
                     process_id=1, timeout_s=1.0)
  with pytest.raises(config_utils.ConfigError,
                     match=f"coordinator localhost:{port} did not answer within 1 s"):
    distributed.initialize(config)


def test_missing_process_times_out_on_the_coordinator():
  port = _free_port()
  config = _settings(coordinator_address=f"localhost:{port}", num_processes=3,
                     process_id=0, timeout_s=1.0)
  with pytest.raises(config_utils.ConfigError,
                     match=r"processes \[1, 2\] did not join"):
    distributed.initialize(config)


def test_processes_with_different_configs_are_refused():
  port = _free_port()
  address = f"localhost:{port}"
  host_config = _settings(coordinator_address=address, num_processes=2,
                          process_id=0, timeout_s=10.0)
  other = _settings(coordinator_address=address, num_processes=2, process_id=1,
                    timeout_s=10.0)
  with other.unlocked():
    other.optimizer.learning_rate = 0.5
  assert (distributed.config_fingerprint(host_config)
          != distributed.config_fingerprint(other))
  errors = {}

  def join():
    try:
      distributed._join("localhost", port, 1,
                        distributed.config_fingerprint(other), 10.0)
    except config_utils.ConfigError as e:
      errors["peer"] = str(e)

  thread = threading.Thread(target=join)
  thread.start()
  with pytest.raises(config_utils.ConfigError, match=r"processes \[1\] were "
                     "started with a different config"):
    distributed._host_join("localhost", port, 2,
                           distributed.config_fingerprint(host_config), 10.0)
  thread.join()
  assert "different config" in errors["peer"]


def test_fingerprint_ignores_who_the_process_is():
  a = _settings(process_id=0)
  b = _settings(process_id=1)
  assert distributed.config_fingerprint(a) == distributed.config_fingerprint(b)


def test_environment_overrides_and_bad_values(monkeypatch):
  monkeypatch.setenv("AVB_COORDINATOR", "localhost:1234")
  monkeypatch.setenv("AVB_NUM_PROCESSES", "2")
  monkeypatch.setenv("AVB_PROCESS_ID", "7")
  settings = distributed.settings(_config())
  assert settings["enabled"] and settings["num_processes"] == 2
  with pytest.raises(config_utils.ConfigError, match="process_id=7 is invalid"):
    distributed.initialize(_config())
  monkeypatch.setenv("AVB_PROCESS_ID", "x")
  with pytest.raises(config_utils.ConfigError, match="AVB_PROCESS_ID='x'"):
    distributed.settings(_config())
  monkeypatch.setenv("AVB_PROCESS_ID", "1")
  monkeypatch.setenv("AVB_COORDINATOR", "no-port")
  with pytest.raises(config_utils.ConfigError, match="host:port"):
    distributed.initialize(_config())


def test_cli_reports_an_unreachable_coordinator_on_one_line(tmp_path):
  port = _free_port()
  env = dict(os.environ, AVB_COORDINATOR=f"localhost:{port}",
             AVB_NUM_PROCESSES="2", AVB_PROCESS_ID="1")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.mnist",
       "--config=experiments/configs/mnist.py:smoke",
       "--config.distributed.timeout_s=1", f"--workdir={tmp_path}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("error: the coordinator"), result.stderr[-2000:]
  assert "Traceback" not in result.stderr
