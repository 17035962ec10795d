"""Tests for the dSprites architectures of avb/models.py: "conv" and "fc_higgins"."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from avb import models
from avb import train


def _conv(**overrides):
  base = dict(data_shape=(64, 64), num_latents=10, hidden_sizes=(256, 256),
              activation="relu", likelihood="bernoulli", init="lecun",
              architecture="conv")
  base.update(overrides)
  return models.ModelConfig(**base)


def _shapes(params):
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {jax.tree_util.keystr(p): tuple(v.shape) for p, v in flat}


@pytest.fixture(scope="module")
def burgess():
  """Burgess et al.'s network and its parameters (initialised once: slow)."""
  config = _conv()
  # jit: an eager init dispatches every convolution on its own (much slower).
  init = jax.jit(models.init_params, static_argnums=0)
  return config, init(config, jax.random.key(0))


def test_burgess_conv_layers_and_shapes(burgess):
  config, params = burgess
  shapes = _shapes(params)
  # Encoder: four 4x4 convolutions of 32 channels, FC 256, 256, then 2 x 10.
  assert shapes["['encoder']['conv']['conv_0']['kernel']"] == (4, 4, 1, 32)
  for i in (1, 2, 3):
    assert shapes[f"['encoder']['conv']['conv_{i}']['kernel']"] == (4, 4, 32, 32)
  assert shapes["['encoder']['mlp']['hidden_0']['kernel']"] == (4 * 4 * 32, 256)
  assert shapes["['encoder']['mlp']['hidden_1']['kernel']"] == (256, 256)
  assert shapes["['encoder']['mean']['kernel']"] == (256, 10)
  assert shapes["['encoder']['log_var']['kernel']"] == (256, 10)
  # Decoder: the transpose, ending in one channel of logits.
  assert shapes["['decoder']['mlp']['hidden_0']['kernel']"] == (10, 256)
  assert shapes["['decoder']['to_conv']['kernel']"] == (256, 4 * 4 * 32)
  for i in (0, 1, 2):
    assert shapes[f"['decoder']['deconv']['deconv_{i}']['kernel']"] == (4, 4, 32, 32)
  assert shapes["['decoder']['deconv']['deconv_3']['kernel']"] == (4, 4, 32, 1)

  model = models.VAE(config)
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                            method=models.VAE.encode))
  decode = jax.jit(lambda p, z: model.apply({"params": p}, z,
                                            method=models.VAE.decode))
  mean, log_var = encode(params, jnp.zeros((3, 64 * 64)))
  assert mean.shape == log_var.shape == (3, 10)
  # [L, B, J]: leading axes pass through.
  assert decode(params, jnp.zeros((2, 3, 10)))["logits"].shape == (2, 3, 64 * 64)


def test_conv_is_translation_aware_not_a_disguised_mlp(burgess):
  """A shift of the input by one stride-product (16 px) shifts the top feature map."""
  config, params = burgess
  image = np.zeros((64, 64), np.float32)
  image[10:20, 10:20] = 1.0
  shifted = np.roll(image, 16, axis=1)
  features = jax.jit(models.ConvStack(config).apply)(
      {"params": params["encoder"]["conv"]},
      jnp.asarray(np.stack([image, shifted]))[..., None])
  assert features.shape == (2, 4, 4, 32)
  np.testing.assert_allclose(features[1, :, 1:], features[0, :, :-1], atol=1e-5)


def test_fc_higgins_is_the_papers_network():
  config = models.ModelConfig(data_shape=(64, 64), num_latents=10,
                              hidden_sizes=(7,), activation="tanh",
                              architecture="fc_higgins", init="lecun")
  shapes = _shapes(models.init_params(config, jax.random.key(0)))
  assert shapes["['encoder']['mlp']['hidden_0']['kernel']"] == (4096, 1200)
  assert shapes["['encoder']['mlp']['hidden_1']['kernel']"] == (1200, 1200)
  assert shapes["['encoder']['mean']['kernel']"] == (1200, 10)
  assert shapes["['decoder']['mlp']['hidden_0']['kernel']"] == (10, 1200)
  assert shapes["['decoder']['mlp']['hidden_2']['kernel']"] == (1200, 1200)
  assert shapes["['decoder']['logits']['kernel']"] == (1200, 4096)
  assert config.encoder_activation == "relu"
  assert config.decoder_activation_name == "tanh"


def test_fc_higgins_activations_are_relu_then_tanh():
  """The encoder's hidden units are ReLU (>= 0), the decoder's tanh (|h| < 1)."""
  config = models.ModelConfig(data_shape=(8, 8), num_latents=3,
                              architecture="fc_higgins", init="lecun")
  params = models.init_params(config, jax.random.key(2))
  x = jax.random.normal(jax.random.key(3), (5, 64))
  hidden = models.MLP(config, config.encoder_sizes, "relu").apply(
      {"params": params["encoder"]["mlp"]}, x)
  assert jnp.all(hidden >= 0) and jnp.any(hidden > 0)
  z = 10.0 * jax.random.normal(jax.random.key(4), (5, 3))
  hidden = models.MLP(config, config.decoder_sizes, "tanh").apply(
      {"params": params["decoder"]["mlp"]}, z)
  assert jnp.all(jnp.abs(hidden) < 1) and jnp.any(hidden < 0)


def test_mlp_decoder_options_and_default_unchanged():
  config = models.ModelConfig(data_shape=(4, 4), num_latents=2,
                              hidden_sizes=(8, 6), decoder_hidden_sizes=(5,),
                              decoder_activation="relu")
  shapes = _shapes(models.init_params(config, jax.random.key(0)))
  assert shapes["['decoder']['mlp']['hidden_0']['kernel']"] == (2, 5)
  assert config.decoder_activation_name == "relu"
  assert config.encoder_activation == "tanh"
  default = models.ModelConfig(data_shape=(4, 4), num_latents=2,
                               hidden_sizes=(8, 6))
  assert default.architecture == "mlp" and default.decoder_sizes == (6, 8)


def test_from_config_reads_new_fields_and_old_configs_still_build():
  section = ml_collections.ConfigDict(dict(
      num_latents=10, hidden_sizes=(256, 256), activation="relu",
      likelihood="bernoulli", init="lecun", init_std=0.01,
      architecture="conv", conv_channels=(16, 16, 32, 32),
      decoder_hidden_sizes=None, decoder_activation=None))
  config = models.ModelConfig.from_config(section, (64, 64))
  assert config.architecture == "conv" and config.conv_channels == (16, 16, 32, 32)
  old = ml_collections.ConfigDict(dict(
      num_latents=3, hidden_sizes=(500,), activation="tanh",
      likelihood="bernoulli", init="paper", init_std=0.01))
  assert models.ModelConfig.from_config(old, (28, 28)).architecture == "mlp"


@pytest.mark.parametrize("overrides,match", [
    (dict(architecture="resnet"), "architecture"),
    (dict(data_shape=(28, 28)), "divisible by 16"),
    (dict(data_shape=(4096,)), r"\[H, W\]"),
])
def test_bad_architecture_settings_raise(overrides, match):
  with pytest.raises(ValueError, match=match):
    _conv(**overrides)


@pytest.mark.parametrize("architecture", [
    pytest.param("conv", marks=pytest.mark.slow), "fc_higgins"])
def test_train_helpers_work_unchanged(architecture):
  """train.encode / train.elbo_terms see [B, D] data for every architecture."""
  config = _conv(architecture=architecture, data_shape=(16, 16),
                 hidden_sizes=(16,), conv_channels=(4, 4), num_latents=3)
  params = jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(0))
  x = (jax.random.uniform(jax.random.key(1), (4, 256)) > 0.7).astype(jnp.float32)
  terms = train.elbo_terms(config, params, x, jax.random.key(2), "B", 2)
  assert terms["elbo"].shape == (4,) and terms["z"].shape == (2, 4, 3)
  assert bool(jnp.all(jnp.isfinite(terms["elbo"])))
  # One gradient step on the negative ELBO lowers it on that batch.
  loss = lambda p: -jnp.mean(
      train.elbo_terms(config, p, x, jax.random.key(2), "B", 2)["elbo"])
  value_and_grad = jax.jit(jax.value_and_grad(loss))
  before, grads = value_and_grad(params)
  stepped = jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)
  assert value_and_grad(stepped)[0] < before


def test_conv_gaussian_head():
  config = _conv(likelihood="gaussian", conv_channels=(4, 4), hidden_sizes=(8,),
                 data_shape=(8, 8), num_latents=2)
  params = models.init_params(config, jax.random.key(0))
  decoded = models.VAE(config).apply({"params": params}, jnp.zeros((3, 2)),
                                     method=models.VAE.decode)
  assert decoded["mean"].shape == decoded["log_var"].shape == (3, 64)
  assert bool(jnp.all((decoded["mean"] > 0) & (decoded["mean"] < 1)))
