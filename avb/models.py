"""The paper's MLP encoder and decoder (Kingma & Welling 2013, appendix C).

Encoder: x -> hidden (tanh) -> (mean, log_var) of q(z|x), a diagonal Gaussian.
Decoder: z -> hidden (tanh) -> likelihood parameters of p(x|z):
  * "bernoulli": per-pixel logits (MNIST);
  * "gaussian": per-pixel mean through a sigmoid and a free log-variance
    (Frey Face, appendix C).

Written in Flax linen: a VAE here is a pure function of (params, x), which is
what the estimators, `jax.grad`, `vmap` and `jit` want; linen keeps parameters
out of the module, so the same params pytree is checkpointed, sharded and
vmapped over seeds without any split/merge step.
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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that fixes the model's shapes and function.

  Attributes:
    data_shape: shape of one datapoint, e.g. (28, 28); flattened inside.
    num_latents: J, the size of z.
    hidden_sizes: widths of the encoder's hidden layers; the decoder mirrors
      them (the paper: one layer of 500 for MNIST, 200 for Frey Face).
    activation: hidden nonlinearity (the paper: tanh).
    likelihood: "bernoulli" or "gaussian".
    init: "paper" draws every weight and bias from N(0, init_std^2), as in
      the paper's section 5; "lecun" is Flax's default (LeCun-normal kernels,
      zero biases).
    init_std: standard deviation for init="paper". The paper writes
      N(0, 0.01); we read 0.01 as the standard deviation.
  """
  data_shape: tuple[int, ...]
  num_latents: int
  hidden_sizes: tuple[int, ...] = (500,)
  activation: str = "tanh"
  likelihood: str = "bernoulli"
  init: str = "paper"
  init_std: float = 0.01

  @property
  def data_dim(self) -> int:
    return math.prod(self.data_shape)

  @classmethod
  def from_config(cls, model_config: ml_collections.ConfigDict,
                  data_shape: tuple[int, ...]) -> "ModelConfig":
    """Builds the frozen model description from `config.model`."""
    return cls(
        data_shape=tuple(int(d) for d in data_shape),
        num_latents=int(model_config.num_latents),
        hidden_sizes=tuple(int(h) for h in model_config.hidden_sizes),
        activation=str(model_config.activation),
        likelihood=str(model_config.likelihood),
        init=str(model_config.init),
        init_std=float(model_config.init_std),
    )


def _dense(config: ModelConfig, features: int, name: str) -> nn.Dense:
  if config.init == "paper":
    init = nn.initializers.normal(stddev=config.init_std)
    return nn.Dense(features, kernel_init=init, bias_init=init, name=name)
  return nn.Dense(features, name=name)


class MLP(nn.Module):
  """Hidden layers of the encoder or decoder."""
  config: ModelConfig
  sizes: tuple[int, ...]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    activation = _ACTIVATIONS[self.config.activation]
    for i, size in enumerate(self.sizes):
      x = activation(_dense(self.config, size, f"hidden_{i}")(x))
    return x


class Encoder(nn.Module):
  """q(z|x) = N(z; mean(x), diag(exp(log_var(x))))."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = MLP(self.config, self.config.hidden_sizes, name="mlp")(x)
    mean = _dense(self.config, self.config.num_latents, "mean")(h)
    log_var = _dense(self.config, self.config.num_latents, "log_var")(h)
    return mean, log_var


class Decoder(nn.Module):
  """p(x|z): returns the likelihood's parameters as a dict over pixels [..., D]."""
  config: ModelConfig

  @nn.compact
  def __call__(self, z: jax.Array) -> dict[str, jax.Array]:
    config = self.config
    h = MLP(config, tuple(reversed(config.hidden_sizes)), name="mlp")(z)
    if config.likelihood == "bernoulli":
      return {"logits": _dense(config, config.data_dim, "logits")(h)}
    mean = jax.nn.sigmoid(_dense(config, config.data_dim, "mean")(h))
    log_var = _dense(config, config.data_dim, "log_var")(h)
    return {"mean": mean, "log_var": log_var}


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
