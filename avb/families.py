"""Reparameterizable, factorised variational families q(z|x) and their priors.

Kingma & Welling (2013, section 2.4) list three ways of writing a sample of
q(z|x) as a differentiable map z = g(params, noise) of parameter-free noise:
a tractable inverse CDF applied to uniform noise, a location-scale transform of
a standard draw, and compositions of such maps. This module puts a few of each
behind one interface, so that the SGVB estimators run unchanged on any of them.

Parameterisation: every family takes the same two unconstrained encoder
outputs per latent, `loc` and `log_scale`, each [B, J], bundled as
`Params(loc, log_scale)`:

  family      q(z|x)                                  prior p(z)     noise
  ----------  --------------------------------------  -------------  --------
  gaussian    N(loc, exp(log_scale)^2)                N(0, 1)        N(0, 1)
  laplace     Laplace(loc, exp(log_scale))            Laplace(0, 1)  U(0, 1)
  logistic    Logistic(loc, exp(log_scale))           Logistic(0,1)  U(0, 1)
  cauchy      Cauchy(loc, exp(log_scale))             Cauchy(0, 1)   U(0, 1)
  gumbel      Gumbel(loc, exp(log_scale)) (max type)  Gumbel(0, 1)   U(0, 1)
  lognormal   exp(N(loc, exp(log_scale)^2)), z > 0    LogNormal(0,1) N(0, 1)

So `log_scale` is always the log of the scale parameter; for the Gaussian that
is the log standard deviation, log_scale = log_var / 2, and the caller that
holds the encoder's `log_var` (as `avb.train.encode` returns it) passes
`0.5 * log_var`. With that, "gaussian" reproduces `avb.estimators` exactly:
same noise from the same key, same z, same ELBO up to float rounding.

The laplace, logistic, cauchy and gumbel samplers are inverse CDFs of uniform
noise. A uniform draw can be exactly 0 (jax.random.uniform returns [0, 1)), and
a user may pass 1, where the inverse CDFs are infinite. So uniform noise is
clamped to [eps, 1 - eps] with eps = finfo(dtype).eps (2^-23 in float32,
2^-52 in float64): both bounds are exactly representable, the clamp only moves
the value 0 (the generator's grid is already eps-spaced), and it truncates each
tail at probability eps, which no test at these sample sizes can see.

All densities are computed in log space. `log_prob_from_noise` evaluates
log q at the sample without forming z - loc (the noise already is the
standardised value), which avoids the cancellation of a tiny scale and is what
the estimators use.
"""
from collections.abc import Callable
import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy import special
import scipy.special

from avb import distributions
from avb import estimators

LOG_2: float = math.log(2.0)
LOG_PI: float = math.log(math.pi)
EULER_GAMMA: float = 0.57721566490153286061

LogLikelihoodFn = estimators.LogLikelihoodFn

# The same validation (and message) as the Gaussian estimators'.
_check_num_samples = estimators._check_num_samples  # pylint: disable=protected-access


class Params(NamedTuple):
  """The two unconstrained encoder outputs of a factorised family.

  Attributes:
    loc: location (for "lognormal": the mean of log z), [B, J].
    log_scale: log of the scale (for "gaussian" and "lognormal": the log
      standard deviation), shaped like `loc`.
  """
  loc: jax.Array
  log_scale: jax.Array


class UnknownFamilyError(ValueError):
  """A variational family name that is not in `FAMILIES`."""


class NoClosedFormKLError(ValueError):
  """Estimator B asked of a family with no closed-form KL to its prior."""


@dataclasses.dataclass(frozen=True)
class Family:
  """A factorised variational family and its default prior, as pure functions.

  All log-densities are elementwise (one term per latent, [..., J]); the
  caller sums over the latent axis. `params` is a `Params` (or any pair
  (loc, log_scale)) broadcasting against the noise or z, e.g. [B, J] against
  [L, B, J].

  Attributes:
    name: the key in `FAMILIES`.
    support: "real" or "positive".
    prior: the prior p(z) per latent, in words.
    noise: (rng, shape, dtype) -> the base draw the sampler transforms
      (standard normal or uniform on [0, 1)).
    sample_from_noise: (params, noise) -> z, differentiable in params.
    log_prob_from_noise: (params, noise) -> log q(z|x) at
      z = sample_from_noise(params, noise); equal to log_prob at that z but
      computed from the noise, so it stays accurate for tiny scales.
    log_prob: (params, z) -> log q(z|x) at any z (-inf outside the support).
    prior_log_prob: z -> log p(z).
    prior_log_prob_from_noise: (params, noise) -> log p(z) at
      z = sample_from_noise(params, noise), without under- or overflowing
      through z (it matters for "lognormal", where z = exp(.)).
    kl_to_prior: params -> KL(q(z|x) || p(z)) per latent, or None when it has
      no closed form (then only estimator A applies).
  """
  name: str
  support: str
  prior: str
  noise: Callable[..., jax.Array]
  sample_from_noise: Callable[[Params, jax.Array], jax.Array]
  log_prob_from_noise: Callable[[Params, jax.Array], jax.Array]
  log_prob: Callable[[Params, jax.Array], jax.Array]
  prior_log_prob: Callable[[jax.Array], jax.Array]
  prior_log_prob_from_noise: Callable[[Params, jax.Array], jax.Array]
  kl_to_prior: Callable[[Params], jax.Array] | None

  @property
  def has_closed_form_kl(self) -> bool:
    return self.kl_to_prior is not None


# ----------------------------------------------------------------------------
# Base noise.


def _normal_noise(rng: jax.Array, shape: tuple[int, ...],
                  dtype=jnp.float32) -> jax.Array:
  return jax.random.normal(rng, shape, dtype=dtype)


def _uniform_noise(rng: jax.Array, shape: tuple[int, ...],
                   dtype=jnp.float32) -> jax.Array:
  # Unclamped: the inverse CDFs clamp, so noise passed in by hand is safe too.
  return jax.random.uniform(rng, shape, dtype=dtype)


def _clamp_uniform(u: jax.Array) -> jax.Array:
  """u clamped to [eps, 1 - eps], away from the inverse CDFs' poles."""
  u = jnp.asarray(u)
  if not jnp.issubdtype(u.dtype, jnp.floating):
    u = u.astype(jnp.result_type(float))
  eps = jnp.finfo(u.dtype).eps
  return jnp.clip(u, eps, 1.0 - eps)


# ----------------------------------------------------------------------------
# Standard (loc 0, scale 1) members: inverse CDF of clamped uniform noise and
# elementwise log-density.


def _identity(noise: jax.Array) -> jax.Array:
  return noise


def _standard_normal_log_prob(eps: jax.Array) -> jax.Array:
  return -0.5 * (distributions.LOG_2PI + jnp.square(eps))


def _standard_laplace_from_uniform(u: jax.Array) -> jax.Array:
  # F^{-1}(u) = log(2u) below the median, -log(2(1 - u)) above. Taking
  # min(u, 1 - u) rather than 1 - 2|u - 1/2| keeps the tails accurate: 1 - u is
  # exact for u >= 1/2, so nothing cancels.
  u = _clamp_uniform(u)
  return -jnp.sign(u - 0.5) * jnp.log(2.0 * jnp.minimum(u, 1.0 - u))


def _standard_laplace_log_prob(eps: jax.Array) -> jax.Array:
  return -LOG_2 - jnp.abs(eps)


def _standard_logistic_from_uniform(u: jax.Array) -> jax.Array:
  u = _clamp_uniform(u)
  return jnp.log(u) - jnp.log1p(-u)  # logit(u)


def _standard_logistic_log_prob(eps: jax.Array) -> jax.Array:
  # log(e^-x / (1 + e^-x)^2), written in |x| (the density is symmetric) so
  # that exp never overflows.
  abs_eps = jnp.abs(eps)
  return -abs_eps - 2.0 * jax.nn.softplus(-abs_eps)


def _standard_cauchy_from_uniform(u: jax.Array) -> jax.Array:
  # F^{-1}(u) = tan(pi (u - 1/2)). Near the poles tan of an argument close to
  # pi/2 inherits the rounding of pi/2 itself; there the equivalent
  # sign(u - 1/2) / tan(pi min(u, 1 - u)) has a small, accurately rounded
  # argument instead.
  u = _clamp_uniform(u)
  centred = u - 0.5
  central = jnp.tan(jnp.pi * centred)
  tail = jnp.sign(centred) / jnp.tan(jnp.pi * jnp.minimum(u, 1.0 - u))
  return jnp.where(jnp.abs(centred) <= 0.25, central, tail)


def _log1p_square(x: jax.Array) -> jax.Array:
  """log(1 + x^2) without overflowing x^2 for huge |x|."""
  abs_x = jnp.abs(x)
  large = abs_x > 1.0
  # Both branches get inputs at which they are finite, so that the unused one
  # cannot put a NaN into the gradient.
  safe_large = jnp.where(large, abs_x, 2.0)
  safe_small = jnp.where(large, 0.0, abs_x)
  return jnp.where(
      large,
      2.0 * jnp.log(safe_large) + jnp.log1p(jnp.square(1.0 / safe_large)),
      jnp.log1p(jnp.square(safe_small)))


def _standard_cauchy_log_prob(eps: jax.Array) -> jax.Array:
  return -LOG_PI - _log1p_square(eps)


def _standard_gumbel_from_uniform(u: jax.Array) -> jax.Array:
  u = _clamp_uniform(u)
  return -jnp.log(-jnp.log(u))


def _standard_gumbel_log_prob(eps: jax.Array) -> jax.Array:
  return -(eps + jnp.exp(-eps))


# ----------------------------------------------------------------------------
# Closed-form KLs to the family's standard prior, elementwise. Each is written
# so that it is exactly 0 at (loc, log_scale) = (0, 0) and has no catastrophic
# cancellation near there, where collapsed latents sit.


def _gaussian_kl(params: Params) -> jax.Array:
  loc, log_scale = params
  return distributions.kl_to_standard_normal(loc, 2.0 * log_scale)


def _laplace_kl(params: Params) -> jax.Array:
  # KL(Laplace(m, b) || Laplace(0, 1)) = E_q|z| - log b - 1
  #   = b exp(-|m| / b) + |m| - log b - 1, as E|z| = |m| + b exp(-|m| / b).
  # With a = log b - |m| / b the first and last terms are expm1(a).
  loc, log_scale = params
  abs_loc = jnp.abs(loc)
  a = log_scale - abs_loc * jnp.exp(-log_scale)
  return jnp.expm1(a) + abs_loc - log_scale


def _cauchy_kl(params: Params) -> jax.Array:
  # KL(Cauchy(m, s) || Cauchy(0, 1)) = log(((1 + s)^2 + m^2) / (4 s))
  #   = log1p(((1 - s)^2 + m^2) / (4 s))
  #   = log1p(sinh(log s / 2)^2 + m^2 / (4 s)),
  # since (1 - s)^2 / (4 s) = sinh(log s / 2)^2; no log(4) - log(4) to cancel.
  loc, log_scale = params
  return jnp.log1p(jnp.square(jnp.sinh(0.5 * log_scale))
                   + 0.25 * jnp.square(loc) * jnp.exp(-log_scale))


# lgamma(1 + x) = -gamma x + sum_{k >= 2} (-1)^k zeta(k) / k x^k for |x| < 1.
# Coefficients k = 2..29: at |x| <= 1/4 the truncation is below 1e-17 relative.
_LOG_GAMMA_SERIES_MAX_X = 0.25
_LOG_GAMMA_SERIES = tuple(
    float((-1) ** k * scipy.special.zeta(k) / k) for k in range(2, 30))


def _log_gamma_plus_euler(log_scale: jax.Array) -> jax.Array:
  """lgamma(b) + gamma (b - 1) at b = exp(log_scale), accurate as b -> 1.

  Near b = 1 the two first-order terms cancel and what is left is
  O((b - 1)^2); lgamma alone carries an absolute rounding error that would
  swamp it in float32, so there the Taylor series of the sum is used instead.

  Args:
    log_scale: log b, any shape.

  Returns:
    lgamma(b) + gamma (b - 1), shaped like `log_scale`.
  """
  x = jnp.expm1(log_scale)  # b - 1 without cancellation
  small = jnp.abs(x) <= _LOG_GAMMA_SERIES_MAX_X
  safe_x = jnp.where(small, x, 0.0)  # keeps the unused branch finite
  series = jnp.zeros_like(safe_x)
  for coefficient in reversed(_LOG_GAMMA_SERIES):
    series = series * safe_x + coefficient
  series = series * jnp.square(safe_x)
  return jnp.where(
      small, series, special.gammaln(jnp.exp(log_scale)) + EULER_GAMMA * x)


def _gumbel_kl(params: Params) -> jax.Array:
  # For q = Gumbel(m, b), p = Gumbel(0, 1), z = m + b eps with eps standard:
  # E[eps] = gamma (Euler's constant), E[exp(-eps)] = 1 and
  # E[exp(-b eps)] = Gamma(1 + b), so
  #   KL = m - log b + gamma (b - 1) + exp(-m) Gamma(1 + b) - 1.
  # With a = lgamma(1 + b) - m and lgamma(1 + b) = lgamma(b) + log b this is
  #   KL = expm1(a) - a + [lgamma(b) + gamma (b - 1)],
  # two terms that are each >= 0 and O(distance^2) near the prior.
  loc, log_scale = params
  centred_log_gamma = _log_gamma_plus_euler(log_scale)
  a = (centred_log_gamma - EULER_GAMMA * jnp.expm1(log_scale) + log_scale
       - loc)
  return jnp.expm1(a) - a + centred_log_gamma


# ----------------------------------------------------------------------------
# Constructors.


def _location_scale_family(
    name: str,
    prior: str,
    noise: Callable[..., jax.Array],
    standard_from_noise: Callable[[jax.Array], jax.Array],
    standard_log_prob: Callable[[jax.Array], jax.Array],
    kl_to_prior: Callable[[Params], jax.Array] | None,
) -> Family:
  """q: loc + exp(log_scale) eps, eps from the standard member; p: standard."""

  def sample_from_noise(params: Params, noise: jax.Array) -> jax.Array:
    loc, log_scale = params
    return loc + jnp.exp(log_scale) * standard_from_noise(noise)

  def log_prob_from_noise(params: Params, noise: jax.Array) -> jax.Array:
    # log q(z) = log f((z - loc) / scale) - log scale, and (z - loc) / scale
    # is the standard draw itself.
    _, log_scale = params
    return standard_log_prob(standard_from_noise(noise)) - log_scale

  def log_prob(params: Params, z: jax.Array) -> jax.Array:
    loc, log_scale = params
    # Multiplying by exp(-log_scale) cannot overflow the way a division by an
    # underflowed scale would.
    return standard_log_prob((z - loc) * jnp.exp(-log_scale)) - log_scale

  def prior_log_prob_from_noise(params: Params, noise: jax.Array) -> jax.Array:
    return standard_log_prob(sample_from_noise(params, noise))

  return Family(
      name=name, support="real", prior=prior, noise=noise,
      sample_from_noise=sample_from_noise,
      log_prob_from_noise=log_prob_from_noise, log_prob=log_prob,
      prior_log_prob=standard_log_prob,
      prior_log_prob_from_noise=prior_log_prob_from_noise,
      kl_to_prior=kl_to_prior)


def _lognormal_family() -> Family:
  """z = exp(y), y ~ N(loc, exp(log_scale)^2): a composition (section 2.4)."""

  def log_z_from_noise(params: Params, noise: jax.Array) -> jax.Array:
    loc, log_scale = params
    return loc + jnp.exp(log_scale) * noise

  def sample_from_noise(params: Params, noise: jax.Array) -> jax.Array:
    return jnp.exp(log_z_from_noise(params, noise))

  def log_prob_from_noise(params: Params, noise: jax.Array) -> jax.Array:
    # Change of variables: log q(z) = log N(log z; loc, scale^2) - log z.
    _, log_scale = params
    return (_standard_normal_log_prob(noise) - log_scale
            - log_z_from_noise(params, noise))

  def _safe_log(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    positive = z > 0
    return positive, jnp.log(jnp.where(positive, z, 1.0))

  def log_prob(params: Params, z: jax.Array) -> jax.Array:
    loc, log_scale = params
    positive, log_z = _safe_log(z)
    value = (_standard_normal_log_prob((log_z - loc) * jnp.exp(-log_scale))
             - log_scale - log_z)
    return jnp.where(positive, value, -jnp.inf)

  def prior_log_prob(z: jax.Array) -> jax.Array:
    positive, log_z = _safe_log(z)
    return jnp.where(positive, _standard_normal_log_prob(log_z) - log_z,
                     -jnp.inf)

  def prior_log_prob_from_noise(params: Params, noise: jax.Array) -> jax.Array:
    log_z = log_z_from_noise(params, noise)
    return _standard_normal_log_prob(log_z) - log_z

  return Family(
      name="lognormal", support="positive", prior="LogNormal(0, 1)",
      noise=_normal_noise, sample_from_noise=sample_from_noise,
      log_prob_from_noise=log_prob_from_noise, log_prob=log_prob,
      prior_log_prob=prior_log_prob,
      prior_log_prob_from_noise=prior_log_prob_from_noise,
      # KL is invariant under the common bijection exp, so it is the Gaussian
      # KL of log z.
      kl_to_prior=_gaussian_kl)


FAMILIES: dict[str, Family] = {
    "gaussian": _location_scale_family(
        "gaussian", "N(0, 1)", _normal_noise, _identity,
        _standard_normal_log_prob, _gaussian_kl),
    "laplace": _location_scale_family(
        "laplace", "Laplace(0, 1)", _uniform_noise,
        _standard_laplace_from_uniform, _standard_laplace_log_prob,
        _laplace_kl),
    "logistic": _location_scale_family(
        "logistic", "Logistic(0, 1)", _uniform_noise,
        _standard_logistic_from_uniform, _standard_logistic_log_prob, None),
    "cauchy": _location_scale_family(
        "cauchy", "Cauchy(0, 1)", _uniform_noise,
        _standard_cauchy_from_uniform, _standard_cauchy_log_prob, _cauchy_kl),
    "gumbel": _location_scale_family(
        "gumbel", "Gumbel(0, 1)", _uniform_noise,
        _standard_gumbel_from_uniform, _standard_gumbel_log_prob, _gumbel_kl),
    "lognormal": _lognormal_family(),
}


def get_family(name: "str | Family") -> Family:
  """The family called `name` (a `Family` is returned unchanged).

  Raises:
    UnknownFamilyError: a ValueError naming `name` and the allowed names.
  """
  if isinstance(name, Family):
    return name
  if name not in FAMILIES:
    raise UnknownFamilyError(
        f"Unknown variational family {name!r}; allowed: "
        f"{', '.join(FAMILIES)}.")
  return FAMILIES[name]


def sample(family: "str | Family", rng: jax.Array, loc: jax.Array,
           log_scale: jax.Array, num_samples: int | None = None) -> jax.Array:
  """Reparameterized samples of q(z|x).

  Args:
    family: a name in `FAMILIES` or a `Family`.
    rng: PRNG key.
    loc: [B, J].
    log_scale: [B, J].
    num_samples: None for one sample shaped like `loc`, or L for [L, B, J].

  Returns:
    loc.shape or [num_samples, *loc.shape].
  """
  family = get_family(family)
  shape = loc.shape if num_samples is None else (num_samples, *loc.shape)
  noise = family.noise(rng, shape, jnp.result_type(loc))
  return family.sample_from_noise(Params(loc, log_scale), noise)


# ----------------------------------------------------------------------------
# Estimators on any family.


def _draw(family: Family, rng: jax.Array, params: Params, num_samples: int
          ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Noise, z, log q(z|x) and log p(z), the last three per latent [L, B, J].

  For "gaussian" the noise (hence z) equals `estimators`'s for the same key.
  """
  noise = family.noise(rng, (num_samples, *params.loc.shape),
                       jnp.result_type(params.loc))  # [L, B, J]
  z = family.sample_from_noise(params, noise)  # [L, B, J]
  log_posterior = family.log_prob_from_noise(params, noise)  # [L, B, J]
  log_prior = family.prior_log_prob_from_noise(params, noise)  # [L, B, J]
  return noise, z, log_posterior, log_prior


def _closed_form_kl(family: Family, params: Params) -> jax.Array:
  if family.kl_to_prior is None:
    raise NoClosedFormKLError(
        f"The {family.name!r} variational family has no closed-form KL to its "
        f"prior {family.prior}; use estimator A "
        "(config.objective.estimator='A').")
  return family.kl_to_prior(params)  # [B, J]


def elbo_terms_family(
    family: "str | Family",
    estimator: str,
    rng: jax.Array,
    loc: jax.Array,
    log_scale: jax.Array,
    log_likelihood_fn: LogLikelihoodFn,
    num_samples: int = 1,
) -> dict[str, jax.Array]:
  """SGVB estimator A or B (paper eqs. 6, 7) for any family of `FAMILIES`.

  A: ELBO ~= 1/L sum_l [log p(x|z_l) + log p(z_l) - log q(z_l|x)].
  B: ELBO ~= 1/L sum_l log p(x|z_l) - KL(q(z|x) || p(z)), the KL in closed
     form, so B exists only for families with `kl_to_prior`.

  For "gaussian" with log_scale = log_var / 2 this equals
  `estimators.elbo_terms(estimator, rng, mean, log_var, ...)`: same z, same
  terms up to float rounding.

  Args:
    family: a name in `FAMILIES` or a `Family`.
    estimator: "A" or "B".
    rng: PRNG key.
    loc: [B, J], see `Params`.
    log_scale: [B, J], see `Params`.
    log_likelihood_fn: z [L, B, J] -> log p(x|z) [L, B].
    num_samples: L, the number of samples per example.

  Returns:
    A dict of per-example terms, as `estimators.elbo_terms` returns them:
      "elbo", "reconstruction", "kl": [B], with elbo = reconstruction - kl
        ("kl" is the Monte Carlo log-ratio for A, the closed form for B);
      "kl_per_latent": [B, J], the closed-form KL per latent where the family
        has one, else (estimator A) its Monte Carlo estimate per latent;
      "z": [L, B, J], the samples.

  Raises:
    UnknownFamilyError: for an unknown family name.
    NoClosedFormKLError: for estimator B on a family without a closed-form KL.
    ValueError: for an unknown estimator or a bad num_samples.
  """
  family = get_family(family)
  if estimator not in ("A", "B"):
    raise ValueError(
        f"Unknown estimator {estimator!r}; expected one of ('A', 'B').")
  num_samples = _check_num_samples(num_samples)
  params = Params(loc, log_scale)
  if estimator == "B":
    # Checked before any sampling, so the error comes at trace time.
    kl_per_latent = _closed_form_kl(family, params)  # [B, J]
  _, z, log_posterior, log_prior = _draw(family, rng, params, num_samples)
  reconstruction = jnp.mean(log_likelihood_fn(z), axis=0)  # [B]
  if estimator == "A":
    log_ratio = log_posterior - log_prior  # [L, B, J]
    kl = jnp.mean(jnp.sum(log_ratio, axis=-1), axis=0)  # [B]
    if family.has_closed_form_kl:
      kl_per_latent = family.kl_to_prior(params)  # [B, J]
    else:
      kl_per_latent = jnp.mean(log_ratio, axis=0)  # [B, J]
  else:
    kl = jnp.sum(kl_per_latent, axis=-1)  # [B]
  return {
      "elbo": reconstruction - kl,  # [B]
      "reconstruction": reconstruction,
      "kl": kl,
      "kl_per_latent": kl_per_latent,
      "z": z,
  }


def iwae_bound_family(
    family: "str | Family",
    rng: jax.Array,
    loc: jax.Array,
    log_scale: jax.Array,
    log_likelihood_fn: LogLikelihoodFn,
    num_samples: int,
) -> jax.Array:
  """The K-sample importance-weighted bound (Burda et al. 2016) for any family.

  logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, z_k ~ q.
  Equals estimator A's ELBO at K = 1 (same key), and for "gaussian" with
  log_scale = log_var / 2 it equals `estimators.iwae_bound`.

  Args:
    family: a name in `FAMILIES` or a `Family`.
    rng: PRNG key.
    loc: [B, J].
    log_scale: [B, J].
    log_likelihood_fn: z [K, B, J] -> log p(x|z) [K, B].
    num_samples: K.

  Returns:
    The bound, [B].
  """
  family = get_family(family)
  num_samples = _check_num_samples(num_samples)
  _, z, log_posterior, log_prior = _draw(
      family, rng, Params(loc, log_scale), num_samples)
  log_weights = (log_likelihood_fn(z)
                 + jnp.sum(log_prior - log_posterior, axis=-1))  # [K, B]
  return jax.nn.logsumexp(log_weights, axis=0) - math.log(num_samples)  # [B]


def importance_log_likelihood_family(
    family: "str | Family",
    rng: jax.Array,
    loc: jax.Array,
    log_scale: jax.Array,
    log_likelihood_fn: LogLikelihoodFn,
    num_samples: int,
    chunk_size: int = 500,
) -> jax.Array:
  """Importance-sampled log p(x) [B] with q(z|x) of any family as proposal.

  `estimators.importance_log_likelihood` with this family's sampler and
  densities: K samples in chunks of at most `chunk_size` decoder passes, so
  memory stays bounded for K in the thousands.
  """
  family = get_family(family)
  params = Params(loc, log_scale)
  dtype = jnp.result_type(loc)

  def draw(key):
    noise = family.noise(key, loc.shape, dtype)  # [B, J]
    z = family.sample_from_noise(params, noise)
    log_ratio = (family.prior_log_prob_from_noise(params, noise)
                 - family.log_prob_from_noise(params, noise))  # [B, J]
    return z, jnp.sum(log_ratio, axis=-1)

  return estimators.importance_log_likelihood(
      rng, loc, 2 * log_scale, log_likelihood_fn, num_samples, chunk_size,
      draw=draw)


def iwae_terms(
    family: "str | Family",
    rng: jax.Array,
    loc: jax.Array,
    log_scale: jax.Array,
    log_likelihood_fn: LogLikelihoodFn,
    num_samples: int,
) -> dict[str, jax.Array]:
  """The K-sample importance-weighted bound and, from the same samples, estimator A.

  For training with the IWAE objective: "iwae" [B] is the bound, and
  "elbo", "reconstruction", "kl" [B] and "kl_per_latent" [B, J] are estimator
  A's averages over the same K samples, for monitoring. At K = 1, "iwae" and
  "elbo" are equal.
  """
  family = get_family(family)
  num_samples = _check_num_samples(num_samples)
  params = Params(loc, log_scale)
  _, z, log_posterior, log_prior = _draw(family, rng, params, num_samples)
  log_likelihood = log_likelihood_fn(z)  # [K, B]
  log_ratio = log_posterior - log_prior  # [K, B, J]
  log_weights = log_likelihood - jnp.sum(log_ratio, axis=-1)  # [K, B]
  reconstruction = jnp.mean(log_likelihood, axis=0)
  kl = jnp.mean(jnp.sum(log_ratio, axis=-1), axis=0)
  return {
      "iwae": jax.nn.logsumexp(log_weights, axis=0) - math.log(num_samples),
      "elbo": reconstruction - kl,
      "reconstruction": reconstruction,
      "kl": kl,
      "kl_per_latent": (family.kl_to_prior(params) if family.has_closed_form_kl
                        else jnp.mean(log_ratio, axis=0)),
      "z": z,
  }
