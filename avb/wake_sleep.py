"""The wake-sleep algorithm (Hinton, Dayan, Frey & Neal 1995) for AEVB's model.

Kingma & Welling (2013, section 5) compare AEVB with wake-sleep on the same
encoder (recognition model q(z|x)) and decoder (generative model p(x|z)p(z)).
Wake-sleep trains them with two separate objectives:

  * wake phase: z ~ q(z|x) for each datapoint, then the decoder parameters
    ascend log p(x|z) + log p(z) at that fixed z (no gradient reaches q, neither
    through the sample nor through its parameters);
  * sleep phase: "dreams" z ~ p(z) = N(0, I), x ~ p(x|z) from the current
    decoder, then the encoder parameters ascend log q(z|x) at the dreamed pair
    (no gradient reaches the decoder).

`wake_sleep_loss` puts both in one scalar whose single `jax.grad` is the wake
gradient for params["decoder"] and the sleep gradient for params["encoder"]:
stop_gradient cuts every other path. The ELBO (estimator B, L=1) of the current
model, which is what the paper plots for wake-sleep, comes back as a metric;
wake-sleep itself does not optimise it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from avb import distributions
from avb import models
from avb import train

PyTree = Any
Metrics = dict[str, jax.Array]


def sample_likelihood(rng: jax.Array, likelihood: str,
                      decoded: dict[str, jax.Array]) -> jax.Array:
  """Draws x ~ p(x|z) from the decoder's outputs.

  Args:
    rng: PRNG key.
    likelihood: "bernoulli" (decoded {"logits"}) or "gaussian" (decoded
      {"mean", "log_var"}, the mean already squashed by the decoder).
    decoded: the decoder's outputs, each [..., D].

  Returns:
    x [..., D]: 0/1 floats for "bernoulli"; mean + exp(log_var / 2) * noise
    for "gaussian".

  Raises:
    ValueError: an unknown likelihood.
  """
  if likelihood == "bernoulli":
    logits = decoded["logits"]
    # u < sigmoid(l) is drawn as log u < log_sigmoid(l): exact at any logit.
    log_uniform = jnp.log(jax.random.uniform(rng, logits.shape, logits.dtype))
    return (log_uniform < jax.nn.log_sigmoid(logits)).astype(logits.dtype)
  if likelihood == "gaussian":
    return distributions.gaussian_sample(rng, decoded["mean"],
                                         decoded["log_var"])
  raise ValueError(f"Unknown likelihood {likelihood!r}; expected one of "
                   f"{distributions.LIKELIHOODS}.")


def sample_dreams(rng: jax.Array, model_config: models.ModelConfig,
                  params: PyTree,
                  num_dreams: int) -> tuple[jax.Array, jax.Array]:
  """Ancestral samples of the generative model: z ~ N(0, I), x ~ p(x|z).

  Args:
    rng: PRNG key.
    model_config: the VAE's shapes.
    params: the VAE's {"encoder", "decoder"} parameters (only the decoder's
      are used).
    num_dreams: how many pairs.

  Returns:
    (z [num_dreams, J], x [num_dreams, D]); no gradient flows through either.
  """
  z_rng, x_rng = jax.random.split(rng)
  decoder_params = jax.lax.stop_gradient(params["decoder"])
  z = jax.random.normal(z_rng, (num_dreams, model_config.num_latents),
                        jnp.result_type(*jax.tree.leaves(decoder_params)))
  decoded = models.Decoder(model_config).apply({"params": decoder_params}, z)
  x = sample_likelihood(x_rng, model_config.likelihood, decoded)
  return z, jax.lax.stop_gradient(x)


def wake_terms(params: PyTree, x: jax.Array, rng: jax.Array,
               model_config: models.ModelConfig) -> Metrics:
  """The wake phase's per-example terms, differentiable in the decoder only.

  z = gaussian_sample(rng, mean, log_var) with (mean, log_var) = q(z|x), the
  encoder and z behind stop_gradient.

  Args:
    params: {"encoder", "decoder"}.
    x: a batch [B, D].
    rng: PRNG key for z.
    model_config: the VAE's shapes.

  Returns:
    Per-example [B] arrays: "log_joint" log p(x|z) + log p(z) (the wake
    objective), "reconstruction" log p(x|z), and the closed-form "kl"
    KL(q(z|x) || p(z)), so that reconstruction - kl is the estimator-B ELBO
    with L=1 at this z; also "z" [B, J].
  """
  wake_params = {"encoder": jax.lax.stop_gradient(params["encoder"]),
                 "decoder": params["decoder"]}
  mean, log_var, log_likelihood_fn = train.encode(model_config, wake_params, x)
  z = jax.lax.stop_gradient(
      distributions.gaussian_sample(rng, mean, log_var))  # [B, J]
  reconstruction = log_likelihood_fn(z[None])[0]  # [B]
  kl = jnp.sum(distributions.kl_to_standard_normal(mean, log_var), axis=-1)
  return {
      "log_joint": reconstruction + distributions.standard_normal_log_prob(z),
      "reconstruction": reconstruction,
      "kl": kl,
      "z": z,
  }


def sleep_terms(params: PyTree, rng: jax.Array,
                model_config: models.ModelConfig, num_dreams: int) -> Metrics:
  """The sleep phase's per-dream terms, differentiable in the encoder only.

  Args:
    params: {"encoder", "decoder"}.
    rng: PRNG key for the dreams (`sample_dreams`).
    model_config: the VAE's shapes.
    num_dreams: how many (z, x) pairs to dream.

  Returns:
    "log_posterior": log q(z_dream | x_dream), [num_dreams] (the sleep
    objective), and the dreams "z" [num_dreams, J], "x" [num_dreams, D].
  """
  z, x = sample_dreams(rng, model_config, params, num_dreams)
  encoder = models.Encoder(model_config)
  mean, log_var = encoder.apply({"params": params["encoder"]}, x)
  return {
      "log_posterior": distributions.diag_gaussian_log_prob(z, mean, log_var),
      "z": z,
      "x": x,
  }


def wake_sleep_loss(params: PyTree, x: jax.Array, rng: jax.Array,
                    model_config: models.ModelConfig, num_dreams: int, *,
                    weight_prior_std: float = 0.0,
                    num_train: int = 1) -> tuple[jax.Array, Metrics]:
  """Both phases of wake-sleep as one loss for one minibatch.

  loss = -(mean_i log p(x_i, z_i) + mean_k log q(z_k | x_k)
           + log p(theta, phi) / N),
  with z_i ~ q(z|x_i) (wake) and (z_k, x_k) dreamed from the model (sleep).
  The first term's gradient reaches only the decoder, the second's only the
  encoder, so one `jax.grad` gives both phases' updates at once; the weight
  prior N(0, weight_prior_std^2 I), spread over the N training points as in
  `train.loss_fn`, reaches each set of parameters through its own weights.

  The wake and sleep keys are `jax.random.split(rng)`, in that order.

  Args:
    params: {"encoder", "decoder"}.
    x: a batch [B, D].
    rng: PRNG key.
    model_config: the VAE's shapes.
    num_dreams: dreams per step (static).
    weight_prior_std: std of the Gaussian weight prior; 0 turns it off.
    num_train: N, the training-set size the prior is spread over.

  Returns:
    (loss, metrics): "loss", "wake" (mean log p(x, z)), "sleep" (mean
    log q(z_dream | x_dream)), and the model's "elbo" (estimator B, L=1, at
    the wake sample) with its "reconstruction" and "kl", all batch means;
    "weight_log_prior".
  """
  wake_rng, sleep_rng = jax.random.split(rng)
  wake = wake_terms(params, x, wake_rng, model_config)
  sleep = sleep_terms(params, sleep_rng, model_config, num_dreams)
  wake_objective = jnp.mean(wake["log_joint"])
  sleep_objective = jnp.mean(sleep["log_posterior"])
  log_prior = train.weight_log_prior(params, weight_prior_std)
  loss = -(wake_objective + sleep_objective + log_prior / num_train)
  reconstruction = jnp.mean(wake["reconstruction"])
  kl = jnp.mean(wake["kl"])
  metrics = {
      "loss": loss,
      "wake": wake_objective,
      "sleep": sleep_objective,
      "elbo": jax.lax.stop_gradient(reconstruction - kl),
      "reconstruction": jax.lax.stop_gradient(reconstruction),
      "kl": jax.lax.stop_gradient(kl),
      "weight_log_prior": log_prior,
  }
  return loss, metrics


def wake_sleep_objective(model_config: models.ModelConfig,
                         config: ml_collections.ConfigDict, num_train: int,
                         num_dreams: int | None = None) -> Callable:
  """The wake-sleep `loss(params, x, rng, hyper) -> (loss, metrics)`.

  What `train.make_train_step` takes.

  The wake-sleep counterpart of `train.aevb_loss`: the weight prior's std is
  `hyper["weight_prior_std"]` when a sweep sets it, else
  `config.objective.weight_prior_std`.

  Args:
    model_config: the VAE's shapes.
    config: an experiment config (reads objective.weight_prior_std).
    num_train: N, for the weight prior.
    num_dreams: dreams per step; None: as many as the minibatch has examples.

  Returns:
    The loss function.
  """
  default_std = config.objective.weight_prior_std

  def loss(params: PyTree, x: jax.Array, rng: jax.Array,
           hyper: dict[str, jax.Array]) -> tuple[jax.Array, Metrics]:
    return wake_sleep_loss(
        params, x, rng, model_config, num_dreams or x.shape[0],
        weight_prior_std=hyper.get("weight_prior_std", default_std),
        num_train=num_train)

  return loss


def make_wake_sleep_train_step(
    model_config: models.ModelConfig, config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation, num_train: int,
    num_dreams: int | None = None,
) -> Callable[[train.TrainState, dict], tuple[train.TrainState, Metrics]]:
  """Returns wake-sleep's pure `train_step(state, batch) -> (state, metrics)`.

  `train.make_train_step` around `wake_sleep_objective`: the same state,
  keys, dynamic binarization and NaN guard as AEVB's step, so it plugs into
  the same loop, jit and mesh. One optimizer update applies the wake gradient
  to the decoder and the sleep gradient to the encoder.

  Args:
    model_config: the VAE's shapes.
    config: an experiment config (reads data.dynamic_binarization and
      objective.weight_prior_std).
    tx: the optimizer (e.g. `train.make_optimizer(config.optimizer)`).
    num_train: N, for the weight prior.
    num_dreams: dreams per step; None: as many as the minibatch has examples.

  Returns:
    The step function.
  """
  return train.make_train_step(
      wake_sleep_objective(model_config, config, num_train, num_dreams), tx,
      dynamic_binarization=config.data.dynamic_binarization)
