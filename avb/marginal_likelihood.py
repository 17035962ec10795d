"""The marginal-likelihood estimator of Kingma & Welling (2013), appendix D.

For a model with few latents the paper estimates log p(x) with posterior
samples rather than with the encoder:

  1. draw L samples from p(z|x) ∝ p(x|z) p(z) with hybrid Monte Carlo;
  2. fit a density estimator q(z) to them;
  3. draw L fresh posterior samples z_l and use
       p(x) ≈ (1/L sum_l q(z_l) / (p(z_l) p(x|z_l)))^-1.

Step 3 is unbiased for 1/p(x) for any normalised q, since
E_{p(z|x)}[q(z) / p(x, z)] = ∫ q(z) dz / p(x) = 1 / p(x); a q close to the
posterior makes the ratio nearly constant, hence a low-variance estimate. Its
variance is finite only when q's tails are lighter than the posterior's, and a
density estimator is only reliable in few dimensions: the paper uses it for
3 latents and reports that the estimates became unreliable beyond that. We
refuse 5 or more latents (`LatentDimensionError`).

Choices the paper leaves open, made here:

  * q is a multivariate Gaussian with full covariance, fitted by maximum
    likelihood (sample mean and covariance) per datapoint. The posteriors of
    these small VAEs are close to Gaussian and unimodal, and a Gaussian fit has
    no bandwidth to choose; on a linear-Gaussian model it recovers the exact
    posterior, which makes the estimator exact in the limit.
  * Several HMC chains per datapoint (`num_chains`), all started at `init_z`
    (e.g. the encoder's mean), sharing a step size tuned during warm-up towards
    a 90% acceptance rate (the rate the paper uses for its HMC), then frozen.
    The first half of the kept samples fits q, the second half, drawn after
    it from the same chains, estimates p(x).
  * Everything in log space: log p(x) = log L - logsumexp_l(log q(z_l) -
    log p(x, z_l)).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp

from avb import distributions
from avb import hmc
from avb import models
from avb import train

PyTree = Any
LogJointFn = Callable[[jax.Array], jax.Array]

MAX_LATENTS = 4


class LatentDimensionError(ValueError):
  """The appendix D estimator was asked for too many latents."""


def check_num_latents(num_latents: int) -> int:
  """Returns num_latents, or raises LatentDimensionError outside [1, 4]."""
  if num_latents >= MAX_LATENTS + 1:
    raise LatentDimensionError(
        f"the appendix D estimator is valid for fewer than {MAX_LATENTS + 1} "
        f"latents, got num_latents={num_latents}; use the importance-sampled "
        "estimate (avb.estimators.importance_log_likelihood)")
  if num_latents < 1:
    raise LatentDimensionError(
        f"num_latents must be in [1, {MAX_LATENTS}], got {num_latents}.")
  return num_latents


def _check_positive_int(value, name: str) -> int:
  try:
    count = operator.index(value)
  except TypeError:
    count = 0
  if count < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return count


def fit_gaussian(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Maximum-likelihood Gaussian fit per datapoint.

  Args:
    samples: [S, B, J].

  Returns:
    (mean [B, J], covariance [B, J, J]); the covariance gets a ridge of 1e-6
    times its mean variance, so that it stays positive definite when the
    samples are degenerate.
  """
  mean = jnp.mean(samples, axis=0)  # [B, J]
  centred = samples - mean  # [S, B, J]
  cov = jnp.einsum("sbi,sbj->bij", centred, centred) / samples.shape[0]
  num_latents = samples.shape[-1]
  ridge = 1e-6 * jnp.trace(cov, axis1=-2, axis2=-1) / num_latents  # [B]
  identity = jnp.eye(num_latents, dtype=cov.dtype)
  return mean, cov + ridge[:, None, None] * identity


def gaussian_log_prob(z: jax.Array, mean: jax.Array,
                      cov: jax.Array) -> jax.Array:
  """log N(z; mean, cov) with a full covariance.

  Args:
    z: [..., B, J].
    mean: [B, J].
    cov: [B, J, J], positive definite.

  Returns:
    [..., B].
  """
  cholesky = jnp.linalg.cholesky(cov)  # [B, J, J]
  identity = jnp.broadcast_to(jnp.eye(cov.shape[-1], dtype=cov.dtype),
                              cov.shape)
  inverse_cholesky = jax.scipy.linalg.solve_triangular(
      cholesky, identity, lower=True)  # [B, J, J]
  whitened = jnp.einsum("bij,...bj->...bi", inverse_cholesky,
                        z - mean)  # [..., B, J]
  log_det = 2.0 * jnp.sum(
      jnp.log(jnp.diagonal(cholesky, axis1=-2, axis2=-1)), axis=-1)  # [B]
  return -0.5 * (jnp.sum(jnp.square(whitened), axis=-1) + log_det
                 + z.shape[-1] * distributions.LOG_2PI)


def appendix_d_terms(
    rng: jax.Array,
    log_joint_fn: LogJointFn,
    init_z: jax.Array,
    *,
    num_chains: int = 10,
    num_samples_per_chain: int = 100,
    num_warmup: int = 200,
    step_size: float = 0.1,
    num_leapfrog: int = 10,
    target_accept: float = 0.9,
) -> dict[str, jax.Array]:
  """The appendix D estimate of log p(x) and its diagnostics, per datapoint.

  Args:
    rng: PRNG key.
    log_joint_fn: z [C, B, J] -> log p(x, z) = log p(x|z) + log p(z) [C, B],
      closing over the batch x [B, ...] and the model; the B datapoints must
      be independent (each row's value may depend only on its own z).
    init_z: where the chains start, [B, J] (e.g. the encoder's mean).
    num_chains: C, HMC chains per datapoint.
    num_samples_per_chain: T; each chain gives T samples to fit q and then T
      fresh ones for the estimate, so L = C * T in each set.
    num_warmup: HMC warm-up transitions per chain (step-size adaptation).
    step_size: the initial HMC step size.
    num_leapfrog: leapfrog steps per HMC transition.
    target_accept: the acceptance rate the warm-up aims at.

  Returns:
    A dict: "log_likelihood" [B], the estimate; "fit_mean" [B, J] and
    "fit_cov" [B, J, J], the fitted q; "accept_prob" [B], the mean
    acceptance probability of the kept transitions; "step_size" [B].

  Raises:
    LatentDimensionError: J >= 5.
    hmc.HMCError: a bad HMC setting.
  """
  check_num_latents(init_z.shape[-1])
  num_chains = _check_positive_int(num_chains, "num_chains")
  num_samples_per_chain = _check_positive_int(num_samples_per_chain,
                                              "num_samples_per_chain")
  num_latents = init_z.shape[-1]
  batch_size = init_z.shape[0]
  init = jnp.broadcast_to(init_z, (num_chains, *init_z.shape))  # [C, B, J]
  # One step size per datapoint, adapted to the mean acceptance of its chains.
  step_sizes = jnp.full((batch_size,), step_size, jnp.result_type(init_z))
  samples, step_sizes, info = hmc.run_chain(
      rng, init, log_joint_fn, 2 * num_samples_per_chain, step_sizes,
      num_leapfrog, num_warmup, target_accept=target_accept)
  # samples: [2T, C, B, J]; info["log_prob"]: [2T, C, B] = log p(x, z).
  num_samples = num_chains * num_samples_per_chain  # L
  fit_samples = samples[:num_samples_per_chain].reshape(
      num_samples, batch_size, num_latents)
  fresh_samples = samples[num_samples_per_chain:].reshape(
      num_samples, batch_size, num_latents)
  fresh_log_joint = info["log_prob"][num_samples_per_chain:].reshape(
      num_samples, batch_size)

  fit_mean, fit_cov = fit_gaussian(fit_samples)
  log_ratio = (gaussian_log_prob(fresh_samples, fit_mean, fit_cov)
               - fresh_log_joint)  # [L, B]
  log_likelihood = math.log(num_samples) - jax.nn.logsumexp(log_ratio, axis=0)
  return {
      "log_likelihood": log_likelihood,  # [B]
      "fit_mean": fit_mean,
      "fit_cov": fit_cov,
      "accept_prob": jnp.mean(info["accept_prob"], axis=(0, 1)),
      "step_size": step_sizes,
  }


def appendix_d_log_likelihood(rng: jax.Array, log_joint_fn: LogJointFn,
                              init_z: jax.Array, **kwargs) -> jax.Array:
  """The appendix D estimate of log p(x), [B]; see `appendix_d_terms`."""
  return appendix_d_terms(rng, log_joint_fn, init_z, **kwargs)["log_likelihood"]


def vae_log_likelihood(rng: jax.Array, model_config: models.ModelConfig,
                       params: PyTree, x: jax.Array, **kwargs) -> jax.Array:
  """Appendix D log p(x) [B] of a trained VAE on a batch x [B, D].

  The chains start at the encoder's mean; the encoder plays no other part, so
  the estimate is one of the decoder's model alone (as for MCEM or wake-sleep,
  whose encoders are not trained on the ELBO).

  Args:
    rng: PRNG key.
    model_config: the VAE's shapes; num_latents must be < 5.
    params: {"encoder", "decoder"}.
    x: the batch [B, D].
    **kwargs: `appendix_d_terms` settings.

  Returns:
    The estimate, [B].
  """
  check_num_latents(model_config.num_latents)
  mean, _, log_likelihood_fn = train.encode(model_config, params, x)

  def log_joint_fn(z):
    return log_likelihood_fn(z) + distributions.standard_normal_log_prob(z)

  return appendix_d_log_likelihood(rng, log_joint_fn, mean, **kwargs)
