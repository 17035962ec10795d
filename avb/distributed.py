"""Multi-process (multi-host) start-up: `jax.distributed.initialize` with checks.

A multi-host run is N copies of the same command, one per host (or, for
tests, per local process), that join one JAX runtime. JAX's own join aborts
the process from C++ with a stack trace when the coordinator never answers,
and nothing in it notices processes started with different configs. So
before calling it, process 0 listens on the coordinator's address and every
other process connects and sends its config's fingerprint; a missing
coordinator, a missing process or a different config each end in one
`ConfigError` line, and only then does JAX take the address over.

On a TPU VM pod slice or under SLURM, JAX discovers the cluster by itself:
leave `coordinator_address` unset and only `jax.distributed.initialize()` runs,
followed by the same config check through a JAX collective.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from typing import Any

import ml_collections

from avb import config_utils

_PROTOCOL = b"avb-join-1"


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The run's distributed settings: `config.distributed`, then environment.

  The environment variables AVB_COORDINATOR, AVB_NUM_PROCESSES and
  AVB_PROCESS_ID override the config, so one config file serves every
  process of a launch and only the environment differs.
  """
  section = config.get("distributed") or ml_collections.ConfigDict()
  result = {
      "enabled": bool(section.get("enabled", False)),
      "coordinator_address": section.get("coordinator_address"),
      "num_processes": section.get("num_processes"),
      "process_id": section.get("process_id"),
      "timeout_s": float(section.get("timeout_s", 120.0)),
  }
  env = os.environ
  if env.get("AVB_COORDINATOR"):
    result["coordinator_address"] = env["AVB_COORDINATOR"]
    result["enabled"] = True
  for key, name in (("num_processes", "AVB_NUM_PROCESSES"),
                    ("process_id", "AVB_PROCESS_ID")):
    if env.get(name):
      try:
        result[key] = int(env[name])
      except ValueError:
        raise config_utils.ConfigError(
            f"{name}={env[name]!r} is not an integer") from None
      result["enabled"] = True
  return result


def config_fingerprint(config: ml_collections.ConfigDict) -> str:
  """A hash of everything in the config except who this process is."""
  data = config.to_dict()
  data.pop("distributed", None)
  text = json.dumps(data, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def initialize(config: ml_collections.ConfigDict) -> bool:
  """Joins a multi-process JAX runtime if the config or environment asks for it.

  Must run before anything touches a JAX device.

  Returns:
    True if this process is now part of a multi-process run.

  Raises:
    ConfigError: bad settings, an unreachable coordinator, processes that did
      not join within the timeout, or processes with different configs.
  """
  opts = settings(config)
  if not opts["enabled"]:
    return False
  import jax  # pylint: disable=g-import-not-at-top

  fingerprint = config_fingerprint(config)
  address = opts["coordinator_address"]
  if address is None:
    # A managed cluster (TPU pod slice, SLURM, ...): JAX finds its peers.
    jax.distributed.initialize()
    _check_same_config_collective(fingerprint)
    return True

  num_processes, process_id = opts["num_processes"], opts["process_id"]
  timeout = opts["timeout_s"]
  if num_processes is None or num_processes < 1:
    raise config_utils.ConfigError(
        f"config.distributed.num_processes={num_processes!r} is invalid: set it "
        "(or AVB_NUM_PROCESSES) to the number of processes, >= 1")
  if process_id is None or not 0 <= process_id < num_processes:
    raise config_utils.ConfigError(
        f"config.distributed.process_id={process_id!r} is invalid: set it (or "
        f"AVB_PROCESS_ID) to this process's index in 0..{num_processes - 1}")
  if timeout <= 0:
    raise config_utils.ConfigError(
        f"config.distributed.timeout_s={timeout!r} is invalid: must be > 0")
  host, port = _split_address(address)
  if process_id == 0:
    _host_join(host, port, num_processes, fingerprint, timeout)
  else:
    _join(host, port, process_id, fingerprint, timeout)
  jax.distributed.initialize(address, num_processes=num_processes,
                             process_id=process_id,
                             initialization_timeout=max(int(timeout), 1))
  return True


def _split_address(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise config_utils.ConfigError(
        f"coordinator address {address!r} is invalid: use host:port, e.g. "
        "localhost:12355")
  return host, int(port)


def _host_join(host: str, port: int, num_processes: int, fingerprint: str,
               timeout: float) -> None:
  """Process 0: waits for every other process and compares their configs."""
  if num_processes == 1:
    return
  server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    server.bind(("" if host in ("localhost", "0.0.0.0") else host, port))
  except OSError as e:
    server.close()
    raise config_utils.ConfigError(
        f"process 0 cannot listen on {host}:{port} ({e.strerror}); pick a free "
        "port for the coordinator address") from None
  server.listen(num_processes)
  deadline = time.monotonic() + timeout
  peers: dict[int, tuple[socket.socket, str]] = {}
  try:
    while len(peers) < num_processes - 1:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        missing = sorted(set(range(1, num_processes)) - set(peers))
        raise config_utils.ConfigError(
            f"processes {missing} did not join the coordinator at "
            f"{host}:{port} within {timeout:g} s; start all "
            f"{num_processes} processes with the same address, or raise "
            "config.distributed.timeout_s")
      server.settimeout(remaining)
      try:
        conn, _ = server.accept()
      except socket.timeout:
        continue
      conn.settimeout(max(deadline - time.monotonic(), 1.0))
      try:
        words = conn.makefile("rb").readline().split()
      except OSError:
        conn.close()
        continue
      if len(words) != 3 or words[0] != _PROTOCOL:
        conn.close()
        continue
      peers[int(words[1])] = (conn, words[2].decode())
    differing = sorted(i for i, (_, f) in peers.items() if f != fingerprint)
    for i, (conn, f) in peers.items():
      reply = b"ok\n" if not differing else b"mismatch %s\n" % ",".join(
          map(str, differing)).encode()
      conn.sendall(reply)
    if differing:
      raise config_utils.ConfigError(
          f"processes {differing} were started with a different config than "
          "process 0; launch every process with the same --config and "
          "overrides")
  finally:
    for conn, _ in peers.values():
      conn.close()
    server.close()


def _join(host: str, port: int, process_id: int, fingerprint: str,
          timeout: float) -> None:
  """Process > 0: connects to process 0 (retrying) and awaits its verdict."""
  deadline = time.monotonic() + timeout
  while True:
    try:
      conn = socket.create_connection((host, port), timeout=2.0)
      break
    except OSError:
      if time.monotonic() > deadline:
        raise config_utils.ConfigError(
            f"the coordinator {host}:{port} did not answer within {timeout:g} s; "
            "start process 0 with the same address (it listens there), check "
            "the address, or raise config.distributed.timeout_s") from None
      time.sleep(0.2)
  with conn:
    conn.settimeout(max(deadline - time.monotonic(), 1.0))
    conn.sendall(b"%s %d %s\n" % (_PROTOCOL, process_id, fingerprint.encode()))
    try:
      reply = conn.makefile("rb").readline().strip()
    except OSError:
      reply = b""
  if reply == b"ok":
    return
  if reply.startswith(b"mismatch"):
    raise config_utils.ConfigError(
        f"process {process_id} was started with a different config than "
        "process 0; launch every process with the same --config and overrides")
  raise config_utils.ConfigError(
      f"the coordinator {host}:{port} did not confirm within {timeout:g} s that "
      "all processes joined; check that every process was started")


def _check_same_config_collective(fingerprint: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  mine = np.frombuffer(bytes.fromhex(fingerprint), np.uint8).astype(np.int32)
  everyone = np.asarray(multihost_utils.process_allgather(mine))
  differing = [i for i in range(jax.process_count())
               if not np.array_equal(everyone[i], mine)]
  if differing:
    raise config_utils.ConfigError(
        f"processes {differing} run a different config than process "
        f"{jax.process_index()}; launch every process with the same --config "
        "and overrides")
