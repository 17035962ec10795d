"""Encoders and decoders: the AEVB paper's MLP and the dSprites architectures.

Three architectures, chosen by `ModelConfig.architecture`:

  * "mlp": the AEVB paper's MLP (Kingma & Welling 2013, appendix C):
    x -> hidden layers -> (mean, log_var); the decoder mirrors the hidden
    widths unless `decoder_hidden_sizes` says otherwise.
  * "conv": the convolutional encoder and decoder of Burgess et al. (2018,
    appendix A.1) for 64x64 single-channel images: four 4x4 convolutions with
    stride 2 and 32 channels (`conv_channels`), then fully connected layers
    of 256 and 256 units (`hidden_sizes`), then (mean, log_var) of the
    latents; the decoder is the transpose: fully connected 256, 256, then
    4 * 4 * 32, reshaped, and four 4x4 transposed convolutions with stride 2
    whose last one has one channel, the Bernoulli logits of every pixel.
    ReLU throughout (`activation`). "SAME" padding, so every stride halves
    (encoder) or doubles (decoder) the side: 64 -> 32 -> 16 -> 8 -> 4.
  * "fc_higgins": the fully connected network Higgins et al. (2017, appendix
    A.2, table 1, "2D shapes") trained on dSprites: encoder 4096 - 1200 -
    1200 (ReLU) - (mean, log_var) of 10 latents; decoder 1200 - 1200 - 1200
    (tanh) - 4096 Bernoulli logits. A preset: `hidden_sizes`, `activation`
    and the decoder fields are ignored. (The appendix itself could not be
    opened offline; the widths and activations were checked against two
    public re-implementations that cite that table.)

Every likelihood head is per pixel and flattened: "bernoulli" gives logits;
"gaussian" a mean through a sigmoid and a free log-variance (Frey Face).

Written in Flax linen: a VAE here is a pure function of (params, x), which is
what the estimators, `jax.grad`, `vmap` and `jit` want; linen keeps parameters
out of the module, so the same params pytree is checkpointed, sharded and
vmapped over seeds without any split/merge step. Data enter flattened [..., D]
for every architecture, so `train.encode` and the estimators work unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,
    "elu": jax.nn.elu,
    "gelu": jax.nn.gelu,
}

ARCHITECTURES = ("mlp", "conv", "fc_higgins")

# Higgins et al. (2017), appendix A.2, table 1, 2D shapes (dSprites).
HIGGINS_ENCODER_SIZES = (1200, 1200)
HIGGINS_DECODER_SIZES = (1200, 1200, 1200)
HIGGINS_ENCODER_ACTIVATION = "relu"
HIGGINS_DECODER_ACTIVATION = "tanh"

# Burgess et al. (2018), appendix A.1.
BURGESS_CONV_CHANNELS = (32, 32, 32, 32)
BURGESS_HIDDEN_SIZES = (256, 256)
CONV_KERNEL = (4, 4)
CONV_STRIDES = (2, 2)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that fixes the model's shapes and function.

  Attributes:
    data_shape: shape of one datapoint, e.g. (28, 28); flattened inside.
    num_latents: J, the size of z.
    hidden_sizes: "mlp": widths of the encoder's hidden layers (the paper:
      one layer of 500 for MNIST, 200 for Frey Face); "conv": widths of the
      fully connected layers after the convolutions (Burgess: 256, 256).
    activation: hidden nonlinearity (the AEVB paper: tanh; Burgess: relu).
    likelihood: "bernoulli" or "gaussian".
    init: "paper" draws every weight and bias from N(0, init_std^2), as in
      the AEVB paper's section 5; "lecun" is Flax's default (LeCun-normal
      kernels, zero biases), what the dSprites configs use.
    init_std: standard deviation for init="paper". The paper writes
      N(0, 0.01); we read 0.01 as the standard deviation.
    architecture: "mlp", "conv" or "fc_higgins" (see the module docstring).
    conv_channels: "conv" only: channels of the encoder's convolutions; the
      decoder's transposed convolutions use them in reverse, the last one
      with a single output channel.
    decoder_hidden_sizes: "mlp" and "conv": the decoder's fully connected
      widths; None mirrors `hidden_sizes`.
    decoder_activation: the decoder's nonlinearity; None means `activation`.
  """
  data_shape: tuple[int, ...]
  num_latents: int
  hidden_sizes: tuple[int, ...] = (500,)
  activation: str = "tanh"
  likelihood: str = "bernoulli"
  init: str = "paper"
  init_std: float = 0.01
  architecture: str = "mlp"
  conv_channels: tuple[int, ...] = BURGESS_CONV_CHANNELS
  decoder_hidden_sizes: tuple[int, ...] | None = None
  decoder_activation: str | None = None

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(
          f"architecture={self.architecture!r} is unknown; choose one of "
          f"{', '.join(ARCHITECTURES)}")
    if self.architecture == "conv":
      image_shape = self.image_shape
      if image_shape is None or not self.conv_channels:
        raise ValueError(
            f"architecture='conv' needs [H, W] or [H, W, C] images and at "
            f"least one conv layer, got data_shape={self.data_shape} and "
            f"conv_channels={self.conv_channels}")
      factor = 2 ** len(self.conv_channels)
      if image_shape[0] % factor or image_shape[1] % factor:
        raise ValueError(
            f"architecture='conv' with {len(self.conv_channels)} stride-2 "
            f"layers needs image sides divisible by {factor}, got "
            f"{image_shape[:2]}")

  @property
  def data_dim(self) -> int:
    return math.prod(self.data_shape)

  @property
  def image_shape(self) -> tuple[int, int, int] | None:
    """(H, W, C) of image data, None for data of another rank."""
    if len(self.data_shape) == 2:
      return (*self.data_shape, 1)
    if len(self.data_shape) == 3:
      return tuple(self.data_shape)
    return None

  @property
  def encoder_sizes(self) -> tuple[int, ...]:
    """The encoder's fully connected widths (after any convolutions)."""
    if self.architecture == "fc_higgins":
      return HIGGINS_ENCODER_SIZES
    return tuple(self.hidden_sizes)

  @property
  def decoder_sizes(self) -> tuple[int, ...]:
    """The decoder's fully connected widths (before any convolutions)."""
    if self.architecture == "fc_higgins":
      return HIGGINS_DECODER_SIZES
    if self.decoder_hidden_sizes is not None:
      return tuple(self.decoder_hidden_sizes)
    return tuple(reversed(self.hidden_sizes))

  @property
  def encoder_activation(self) -> str:
    if self.architecture == "fc_higgins":
      return HIGGINS_ENCODER_ACTIVATION
    return self.activation

  @property
  def decoder_activation_name(self) -> str:
    if self.architecture == "fc_higgins":
      return HIGGINS_DECODER_ACTIVATION
    return self.decoder_activation or self.activation

  @classmethod
  def from_config(cls, model_config: ml_collections.ConfigDict,
                  data_shape: tuple[int, ...]) -> "ModelConfig":
    """Builds the frozen model description from `config.model`.

    The fields added for the dSprites architectures are optional in
    `config.model`, so older configs keep building the MLP.
    """
    decoder_sizes = model_config.get("decoder_hidden_sizes")
    decoder_activation = model_config.get("decoder_activation")
    return cls(
        data_shape=tuple(int(d) for d in data_shape),
        num_latents=int(model_config.num_latents),
        hidden_sizes=tuple(int(h) for h in model_config.hidden_sizes),
        activation=str(model_config.activation),
        likelihood=str(model_config.likelihood),
        init=str(model_config.init),
        init_std=float(model_config.init_std),
        architecture=str(model_config.get("architecture", "mlp")),
        conv_channels=tuple(int(c) for c in model_config.get(
            "conv_channels", BURGESS_CONV_CHANNELS)),
        decoder_hidden_sizes=(None if decoder_sizes is None else
                              tuple(int(h) for h in decoder_sizes)),
        decoder_activation=(None if decoder_activation is None else
                            str(decoder_activation)),
    )


def _initializers(config: ModelConfig) -> dict:
  if config.init == "paper":
    init = nn.initializers.normal(stddev=config.init_std)
    return {"kernel_init": init, "bias_init": init}
  return {}


def _dense(config: ModelConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, name=name, **_initializers(config))


class MLP(nn.Module):
  """Hidden layers of the encoder or decoder."""
  config: ModelConfig
  sizes: tuple[int, ...]
  activation: str | None = None  # None: config.activation

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    activation = _ACTIVATIONS[self.activation or self.config.activation]
    for i, size in enumerate(self.sizes):
      x = activation(_dense(self.config, size, f"hidden_{i}")(x))
    return x


class ConvStack(nn.Module):
  """The convolutions of the "conv" encoder: [N, H, W, C] -> [N, H/2^k, W/2^k, c_k]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    activation = _ACTIVATIONS[self.config.encoder_activation]
    for i, channels in enumerate(self.config.conv_channels):
      x = nn.Conv(channels, CONV_KERNEL, strides=CONV_STRIDES, padding="SAME",
                  name=f"conv_{i}", **_initializers(self.config))(x)
      x = activation(x)
    return x


class DeconvStack(nn.Module):
  """The transposed convolutions of the "conv" decoder, ending in C channels."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    config = self.config
    activation = _ACTIVATIONS[config.decoder_activation_name]
    channels = tuple(reversed(config.conv_channels))[1:] + (config.image_shape[2],)
    for i, features in enumerate(channels):
      x = nn.ConvTranspose(features, CONV_KERNEL, strides=CONV_STRIDES,
                           padding="SAME", name=f"deconv_{i}",
                           **_initializers(config))(x)
      if i < len(channels) - 1:  # the last layer's outputs are parameters
        x = activation(x)
    return x


def _flatten_leading(x: jax.Array, trailing: int) -> tuple[jax.Array, tuple]:
  """[..., *trailing dims] -> [N, *trailing dims], and the leading shape."""
  leading = x.shape[:x.ndim - trailing]
  return x.reshape(-1, *x.shape[x.ndim - trailing:]), leading


class Encoder(nn.Module):
  """q(z|x) = N(z; mean(x), diag(exp(log_var(x)))), x: [..., D] -> [..., J] twice."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    config = self.config
    if config.architecture == "conv":
      flat, leading = _flatten_leading(x, 1)
      h = ConvStack(config, name="conv")(flat.reshape(-1, *config.image_shape))
      h = h.reshape(*leading, -1)
    else:
      h = x
    h = MLP(config, config.encoder_sizes, config.encoder_activation,
            name="mlp")(h)
    mean = _dense(config, config.num_latents, "mean")(h)
    log_var = _dense(config, config.num_latents, "log_var")(h)
    return mean, log_var


class Decoder(nn.Module):
  """p(x|z): returns the likelihood's parameters as a dict over pixels [..., D]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, z: jax.Array) -> dict[str, jax.Array]:
    config = self.config
    h = MLP(config, config.decoder_sizes, config.decoder_activation_name,
            name="mlp")(z)
    if config.architecture == "conv":
      out = self._deconvolve(h)  # [..., D]
      if config.likelihood == "bernoulli":
        return {"logits": out}
      # A free per-pixel log-variance, as the MLP's Gaussian head has.
      log_var = self.param("log_var", nn.initializers.zeros, (config.data_dim,))
      return {"mean": jax.nn.sigmoid(out),
              "log_var": jnp.broadcast_to(log_var, out.shape)}
    if config.likelihood == "bernoulli":
      return {"logits": _dense(config, config.data_dim, "logits")(h)}
    mean = jax.nn.sigmoid(_dense(config, config.data_dim, "mean")(h))
    log_var = _dense(config, config.data_dim, "log_var")(h)
    return {"mean": mean, "log_var": log_var}

  def _deconvolve(self, h: jax.Array) -> jax.Array:
    """Fully connected features [..., F] -> per-pixel outputs [..., D]."""
    config = self.config
    height, width, _ = config.image_shape
    factor = 2 ** len(config.conv_channels)
    start = (height // factor, width // factor, config.conv_channels[-1])
    activation = _ACTIVATIONS[config.decoder_activation_name]
    h = activation(_dense(config, math.prod(start), "to_conv")(h))
    flat, leading = _flatten_leading(h, 1)
    out = DeconvStack(config, name="deconv")(flat.reshape(-1, *start))
    return out.reshape(*leading, config.data_dim)


class VAE(nn.Module):
  """Encoder and decoder under one params tree {"encoder", "decoder"}.

  Data enter flattened, [B, D]; `encode` and `decode` are separate methods so
  the estimators can call the decoder on [L, B, J] samples.
  """
  config: ModelConfig

  def setup(self):
    self.encoder = Encoder(self.config)
    self.decoder = Decoder(self.config)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.encoder(x)

  def decode(self, z: jax.Array) -> dict[str, jax.Array]:
    return self.decoder(z)

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    """Decodes the posterior mean: used for init and for reconstructions."""
    mean, _ = self.encode(x)
    return self.decode(mean)


def decoder_mean(likelihood: str, params: dict[str, jax.Array]) -> jax.Array:
  """The expected pixel values under p(x|z), for pictures."""
  if likelihood == "bernoulli":
    return jax.nn.sigmoid(params["logits"])
  return params["mean"]


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
  """Initial parameters of `VAE(config)`."""
  x = jnp.zeros((1, config.data_dim), jnp.float32)
  return VAE(config).init(rng, x)["params"]
