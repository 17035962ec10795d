"""Log-densities, KL divergences and reparameterized samplers for AEVB.

Everything here is a pure function of arrays, computed in log space so that no
probability is ever formed and then logged (no `log(sigmoid(.))`). Functions
are elementwise unless their docstring says "summed"; the summed ones reduce
over the last (latent or data) axes and broadcast over any leading batch or
sample axes.

Gaussians are parameterized by their mean and log-variance, as the encoder and
decoder of Kingma & Welling (2013) output them.
"""
import math

import jax
import jax.numpy as jnp

LOG_2PI: float = math.log(2.0 * math.pi)

LIKELIHOODS = ("bernoulli", "gaussian")

# The decoder output each likelihood needs, in `likelihood_log_prob`'s `params`.
_LIKELIHOOD_PARAMS = {
    "bernoulli": ("logits",),
    "gaussian": ("mean", "log_var"),
}


def gaussian_sample_from_noise(
    noise: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
  """The reparameterization z = mean + exp(log_var / 2) * noise.

  Being a deterministic, differentiable map of (mean, log_var) for fixed noise
  is what lets gradients of a Monte Carlo objective flow into the encoder
  (paper section 2.4).

  Args:
    noise: standard normal draws; broadcasts against `mean`, typically
      [L, *mean.shape] or mean.shape.
    mean: mean of the Gaussian.
    log_var: log-variance of the Gaussian, same shape as `mean`.

  Returns:
    Samples with the broadcast shape of `noise`, `mean` and `log_var`.
  """
  return mean + jnp.exp(0.5 * log_var) * noise


def gaussian_sample(
    rng: jax.Array,
    mean: jax.Array,
    log_var: jax.Array,
    num_samples: int | None = None,
) -> jax.Array:
  """Reparameterized samples from the diagonal Gaussian N(mean, exp(log_var)).

  Args:
    rng: PRNG key.
    mean: mean, any shape (e.g. [B, J]).
    log_var: log-variance, same shape as `mean`.
    num_samples: None for one sample shaped like `mean`; an int L for L samples
      stacked on a new leading axis.

  Returns:
    mean.shape if `num_samples` is None, else [num_samples, *mean.shape].
  """
  shape = mean.shape if num_samples is None else (num_samples, *mean.shape)
  noise = jax.random.normal(rng, shape, dtype=jnp.result_type(mean))
  return gaussian_sample_from_noise(noise, mean, log_var)


def normal_log_prob(
    x: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
  """Elementwise log N(x; mean, exp(log_var)).

  Args:
    x: points; broadcasts against `mean` and `log_var`.
    mean: mean.
    log_var: log-variance.

  Returns:
    The elementwise log-density, with the broadcast shape of the inputs.
  """
  # Multiplying by exp(-log_var) rather than dividing by exp(log_var) keeps
  # large negative log-variances from overflowing to inf / inf.
  return -0.5 * (LOG_2PI + log_var + jnp.square(x - mean) * jnp.exp(-log_var))


def diag_gaussian_log_prob(
    z: jax.Array, mean: jax.Array, log_var: jax.Array) -> jax.Array:
  """log N(z; mean, diag(exp(log_var))), summed over the last axis.

  Args:
    z: points, [..., J].
    mean: mean, broadcasts against `z`, e.g. [B, J] against z: [L, B, J].
    log_var: log-variance, shaped like `mean`.

  Returns:
    The log-density, [...] (the broadcast shape without the last axis).
  """
  return jnp.sum(normal_log_prob(z, mean, log_var), axis=-1)


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
  """log N(z; 0, I), summed over the last axis: the AEVB prior p(z).

  Args:
    z: points, [..., J].

  Returns:
    The log-density, [...].
  """
  return -0.5 * jnp.sum(LOG_2PI + jnp.square(z), axis=-1)


def kl_to_standard_normal(mean: jax.Array, log_var: jax.Array) -> jax.Array:
  """Elementwise KL(N(mean, exp(log_var)) || N(0, 1)), one term per latent.

  The caller sums over the latent axis for the total KL (paper appendix B) or
  keeps it per latent, e.g. to count active units.

  Args:
    mean: posterior mean, e.g. [B, J].
    log_var: posterior log-variance, shaped like `mean`.

  Returns:
    0.5 * (mean^2 + exp(log_var) - 1 - log_var), shaped like `mean`.
  """
  # expm1 keeps exp(lv) - 1 - lv accurate when lv is near 0, where a collapsed
  # latent sits and where the plain form loses everything to cancellation.
  return 0.5 * (jnp.square(mean) + jnp.expm1(log_var) - log_var)


def kl_diag_gaussians(
    mean_q: jax.Array,
    log_var_q: jax.Array,
    mean_p: jax.Array,
    log_var_p: jax.Array,
) -> jax.Array:
  """Elementwise KL(N(mean_q, exp(log_var_q)) || N(mean_p, exp(log_var_p))).

  Args:
    mean_q: mean of q.
    log_var_q: log-variance of q.
    mean_p: mean of p.
    log_var_p: log-variance of p.

  Returns:
    The elementwise KL, with the broadcast shape of the inputs.
  """
  log_var_ratio = log_var_q - log_var_p
  # Forming exp(log_var_q - log_var_p) instead of a ratio of variances avoids
  # overflow when both variances are extreme but close to each other.
  return 0.5 * (
      jnp.expm1(log_var_ratio) - log_var_ratio
      + jnp.square(mean_q - mean_p) * jnp.exp(-log_var_p))


def bernoulli_log_prob(x: jax.Array, logits: jax.Array) -> jax.Array:
  """Elementwise x * log sigmoid(logits) + (1 - x) * log sigmoid(-logits).

  For binary x this is the Bernoulli log-pmf. For grey-level x in [0, 1] (how
  the paper uses it on MNIST intensities) it is the negative binary
  cross-entropy: a useful reconstruction term but not a normalised density over
  [0, 1], so log-likelihoods reported with it are not comparable to those of
  binarized data.

  Args:
    x: targets in [0, 1]; broadcasts against `logits`.
    logits: Bernoulli logits (log-odds), any real value.

  Returns:
    The elementwise log-probability; finite for any finite logits.
  """
  return (x * jax.nn.log_sigmoid(logits)
          + (1.0 - x) * jax.nn.log_sigmoid(-logits))


def likelihood_log_prob(
    likelihood: str, x: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
  """log p(x | decoder output), summed over the data axes.

  Args:
    likelihood: one of `LIKELIHOODS`. "bernoulli" needs params {"logits"};
      "gaussian" needs {"mean", "log_var"}, with the mean already squashed by
      the decoder and a per-pixel log-variance (paper appendix C, Frey Face).
    x: data, [B, *data_shape] (usually flattened, [B, D]).
    params: decoder outputs, each broadcasting against `x` with any number of
      extra leading sample axes, e.g. logits: [L, B, D].

  Returns:
    The log-likelihood with the data axes summed out, e.g. [L, B] for
    params [L, B, D] and x [B, D].

  Raises:
    ValueError: for an unknown likelihood name, missing params, or an x without
      a batch axis.
  """
  if likelihood not in _LIKELIHOOD_PARAMS:
    raise ValueError(
        f"Unknown likelihood {likelihood!r}; expected one of {LIKELIHOODS}.")
  needed = _LIKELIHOOD_PARAMS[likelihood]
  missing = tuple(k for k in needed if k not in params)
  if missing:
    raise ValueError(
        f"Likelihood {likelihood!r} needs params {needed}, missing {missing}.")
  if x.ndim < 2:
    raise ValueError(
        f"x must be [B, *data_shape] with a batch axis, got shape {x.shape}.")
  if likelihood == "bernoulli":
    log_prob = bernoulli_log_prob(x, params["logits"])
  else:
    log_prob = normal_log_prob(x, params["mean"], params["log_var"])
  # The data axes are the trailing x.ndim - 1 axes whatever the number of
  # leading sample axes the params carry.
  data_axes = tuple(range(-(x.ndim - 1), 0))
  return jnp.sum(log_prob, axis=data_axes)
