"""Tests for avb/models.py: shapes, likelihood heads and the paper's initialisation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from avb import models


def _config(**overrides):
  base = dict(data_shape=(28, 28), num_latents=5, hidden_sizes=(64,),
              activation="tanh", likelihood="bernoulli", init="paper",
              init_std=0.01)
  base.update(overrides)
  return models.ModelConfig(**base)


def test_from_config_builds_frozen_dataclass():
  section = ml_collections.ConfigDict(dict(
      num_latents=3, hidden_sizes=(500,), activation="tanh",
      likelihood="bernoulli", init="paper", init_std=0.01))
  config = models.ModelConfig.from_config(section, (28, 20))
  assert config.data_dim == 560 and config.num_latents == 3
  with pytest.raises(Exception):
    config.num_latents = 4  # frozen: typos and mutation fail early


@pytest.mark.parametrize("likelihood,heads", [
    ("bernoulli", {"logits"}), ("gaussian", {"mean", "log_var"})])
def test_shapes_and_heads(likelihood, heads):
  config = _config(likelihood=likelihood, hidden_sizes=(32, 16))
  params = models.init_params(config, jax.random.key(0))
  model = models.VAE(config)
  x = jnp.ones((7, 784)) * 0.5
  mean, log_var = model.apply({"params": params}, x, method=models.VAE.encode)
  assert mean.shape == log_var.shape == (7, 5)
  z = jnp.zeros((3, 7, 5))  # [L, B, J]: the decoder maps over leading axes
  decoded = model.apply({"params": params}, z, method=models.VAE.decode)
  assert set(decoded) == heads
  for value in decoded.values():
    assert value.shape == (3, 7, 784)
  # Decoder mirrors the encoder's hidden widths.
  assert params["decoder"]["mlp"]["hidden_0"]["kernel"].shape == (5, 16)
  assert params["decoder"]["mlp"]["hidden_1"]["kernel"].shape == (16, 32)
  if likelihood == "gaussian":
    assert jnp.all((decoded["mean"] > 0) & (decoded["mean"] < 1))


def test_paper_init_is_normal_with_std_0_01_for_weights_and_biases():
  config = _config(hidden_sizes=(500,))
  params = models.init_params(config, jax.random.key(1))
  kernel = np.asarray(params["encoder"]["mlp"]["hidden_0"]["kernel"])
  bias = np.asarray(params["decoder"]["logits"]["bias"])
  assert abs(kernel.std() - 0.01) < 0.0002 and abs(kernel.mean()) < 0.0002
  assert abs(bias.std() - 0.01) < 0.001  # biases too, not zeros
  lecun = models.init_params(_config(hidden_sizes=(500,), init="lecun"),
                             jax.random.key(1))
  assert np.all(np.asarray(lecun["decoder"]["logits"]["bias"]) == 0)
  # LeCun normal: std 1/sqrt(fan_in) = 1/28 for the first layer.
  lecun_kernel = np.asarray(lecun["encoder"]["mlp"]["hidden_0"]["kernel"])
  assert abs(lecun_kernel.std() - 1 / 28) < 0.003


def test_decoder_mean():
  logits = jnp.array([-100.0, 0.0, 100.0])
  np.testing.assert_allclose(
      models.decoder_mean("bernoulli", {"logits": logits}), [0, 0.5, 1], atol=1e-6)
  mean = jnp.array([0.2, 0.3])
  np.testing.assert_array_equal(
      models.decoder_mean("gaussian", {"mean": mean, "log_var": mean}), mean)
