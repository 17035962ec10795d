"""Tests for avb.families against scipy.stats, quadrature and Monte Carlo.

Every family is checked against an oracle that uses no avb code: scipy's
log-densities and CDFs (for the Kolmogorov-Smirnov test), scipy's quadrature
for the closed-form KLs, and Monte Carlo with a tolerance of 5 standard errors
estimated from the same samples. Seeds are fixed, so the tests are
deterministic.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate
from scipy import stats

from avb import distributions
from avb import estimators
from avb import families

NUM_STANDARD_ERRORS = 5.0
KS_MIN_P_VALUE = 1e-3
NUM_DRAWS = 20_000

ALL_FAMILIES = tuple(families.FAMILIES)
CLOSED_FORM_FAMILIES = tuple(
    name for name, family in families.FAMILIES.items()
    if family.has_closed_form_kl)


@pytest.fixture
def x64():
  """Runs a test in float64 so comparisons with scipy can be tight."""
  with jax.enable_x64(True):
    yield


def _key(seed: int) -> jax.Array:
  """A PRNG key of the "rbg" implementation.

  The code under test takes any key. On CPU, XLA compiles a threefry draw
  (the default) in about a second per call site, which would dominate these
  tests' run time; RngBitGenerator compiles in a fraction of that.
  """
  return jax.random.key(seed, impl="rbg")


def scipy_distribution(name: str, loc, log_scale):
  """The frozen scipy distribution of q(z|x) with these parameters."""
  scale = np.exp(log_scale)
  if name == "lognormal":
    return stats.lognorm(s=scale, scale=np.exp(loc))
  scipy_name = {"gaussian": "norm", "gumbel": "gumbel_r"}.get(name, name)
  return getattr(stats, scipy_name)(loc=loc, scale=scale)


def _random_params(seed: int, shape=(3, 4)):
  rng = np.random.default_rng(seed)
  return (rng.uniform(-1.5, 1.5, size=shape),
          rng.uniform(-1.0, 0.7, size=shape))


def test_registry_and_closed_forms():
  assert set(ALL_FAMILIES) == {
      "gaussian", "laplace", "logistic", "cauchy", "gumbel", "lognormal"}
  assert set(CLOSED_FORM_FAMILIES) == set(ALL_FAMILIES) - {"logistic"}
  for name, family in families.FAMILIES.items():
    assert family.name == name
    assert families.get_family(name) is family
    assert families.get_family(family) is family


def test_unknown_family_raises_naming_it_and_the_allowed_ones():
  with pytest.raises(families.UnknownFamilyError) as info:
    families.get_family("weibull")
  assert isinstance(info.value, ValueError)
  message = str(info.value)
  assert "'weibull'" in message
  for name in ALL_FAMILIES:
    assert name in message
  with pytest.raises(ValueError, match="weibull"):
    families.elbo_terms_family(
        "weibull", "A", jax.random.key(0), jnp.zeros((1, 1)),
        jnp.zeros((1, 1)), lambda z: jnp.zeros(z.shape[:2]))


def test_estimator_b_without_closed_form_kl_raises():
  with pytest.raises(families.NoClosedFormKLError) as info:
    families.elbo_terms_family(
        "logistic", "B", jax.random.key(0), jnp.zeros((2, 3)),
        jnp.zeros((2, 3)), lambda z: jnp.zeros(z.shape[:2]))
  assert isinstance(info.value, ValueError)
  assert "'logistic'" in str(info.value)
  assert str(info.value).endswith(
      "has no closed-form KL to its prior Logistic(0, 1); use estimator A "
      "(config.objective.estimator='A').")


def test_unknown_estimator_raises():
  with pytest.raises(ValueError, match="Unknown estimator 'C'"):
    families.elbo_terms_family(
        "gaussian", "C", jax.random.key(0), jnp.zeros((1, 1)),
        jnp.zeros((1, 1)), lambda z: jnp.zeros(z.shape[:2]))


@functools.partial(jax.jit, static_argnums=0)
def _densities_and_sample_grads(name, loc, log_scale, z, noise):
  """Every density of the family at z and at the samples from `noise`, and
  the gradients of the samples' sum: one compilation per family."""
  family = families.FAMILIES[name]
  params = families.Params(loc, log_scale)

  def sample_sum(loc, log_scale):
    return jnp.sum(family.sample_from_noise(families.Params(loc, log_scale),
                                            noise))

  grad_loc, grad_log_scale = jax.grad(sample_sum, argnums=(0, 1))(
      loc, log_scale)
  return {
      "log_prob": family.log_prob(params, z),
      "prior_log_prob": family.prior_log_prob(z),
      "sample": family.sample_from_noise(params, noise),
      "log_prob_from_noise": family.log_prob_from_noise(params, noise),
      "prior_log_prob_from_noise": family.prior_log_prob_from_noise(
          params, noise),
      "grad_loc": grad_loc,
      "grad_log_scale": grad_log_scale,
  }


@functools.cache
def _densities(name: str):
  """(loc, log_scale, z, outputs) of `_densities_and_sample_grads`."""
  loc, log_scale = _random_params(0)
  q = scipy_distribution(name, loc, log_scale)
  # Points from q itself and far in both tails.
  z = np.stack([q.rvs(random_state=1), q.ppf(1e-6), q.ppf(1 - 1e-6)])
  with jax.enable_x64(True):
    noise = families.FAMILIES[name].noise(
        _key(2), (5, *loc.shape), jnp.float64)
    outputs = _densities_and_sample_grads(name, loc, log_scale, z, noise)
  return loc, log_scale, z, jax.tree.map(np.asarray, outputs)


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_log_prob_matches_scipy(name):
  loc, log_scale, z, outputs = _densities(name)
  q = scipy_distribution(name, loc, log_scale)
  prior = scipy_distribution(name, 0.0, 0.0)
  np.testing.assert_allclose(outputs["log_prob"], q.logpdf(z),
                             rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(outputs["prior_log_prob"], prior.logpdf(z),
                             rtol=1e-10, atol=1e-10)
  # The noise-based forms used by the estimators agree with the direct ones.
  sample = outputs["sample"]
  np.testing.assert_allclose(outputs["log_prob_from_noise"], q.logpdf(sample),
                             rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(outputs["prior_log_prob_from_noise"],
                             prior.logpdf(sample), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_sample_gradients_are_the_reparameterization(name):
  # d z / d loc and d z / d log_scale in closed form: 1 and z - loc for a
  # location-scale family, z and z (log z - loc) for z = exp(loc + s eps);
  # summed over the 5 samples.
  loc, _, _, outputs = _densities(name)
  z = outputs["sample"]  # [5, B, J]
  if name == "lognormal":
    want_loc, want_log_scale = z, z * (np.log(z) - loc)
  else:
    want_loc, want_log_scale = np.ones_like(z), z - loc
  np.testing.assert_allclose(outputs["grad_loc"], want_loc.sum(0),
                             rtol=1e-12)
  np.testing.assert_allclose(outputs["grad_log_scale"],
                             want_log_scale.sum(0), rtol=1e-10, atol=1e-12)


def test_lognormal_is_minus_infinity_off_its_support(x64):
  family = families.FAMILIES["lognormal"]
  params = families.Params(jnp.zeros(3), jnp.zeros(3))
  z = jnp.array([-1.0, 0.0, 1.0])
  expected = [-np.inf, -np.inf, stats.lognorm(s=1.0).logpdf(1.0)]
  np.testing.assert_allclose(family.log_prob(params, z), expected)
  np.testing.assert_allclose(family.prior_log_prob(z), expected)
  grad = jax.grad(lambda z: jnp.sum(jnp.where(
      z > 0, family.log_prob(params, z), 0.0)))(z)
  assert np.all(np.isfinite(grad))


# One representative q per family, away from the prior.
SAMPLING_PARAMS = {
    "gaussian": (0.7, -0.4),
    "laplace": (-0.5, 0.3),
    "logistic": (1.2, -0.2),
    "cauchy": (0.3, 0.5),
    "gumbel": (-1.0, 0.4),
    "lognormal": (0.2, -0.6),
}


@functools.cache
def _draws(name: str) -> np.ndarray:
  loc, log_scale = SAMPLING_PARAMS[name]
  with jax.enable_x64(True):
    z = families.sample(
        name, _key(3), jnp.full((1,), loc, jnp.float64),
        jnp.full((1,), log_scale), num_samples=NUM_DRAWS)
  return np.asarray(z)[:, 0]


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_samples_pass_a_kolmogorov_smirnov_test(name):
  q = scipy_distribution(name, *SAMPLING_PARAMS[name])
  assert stats.kstest(_draws(name), q.cdf).pvalue > KS_MIN_P_VALUE


@pytest.mark.parametrize(
    "name", [name for name in ALL_FAMILIES if name != "cauchy"])
def test_sample_moments_match_scipy(name):
  # The Cauchy has no mean or variance; its KS test above covers it.
  q = scipy_distribution(name, *SAMPLING_PARAMS[name])
  mean, var, excess_kurtosis = (float(m) for m in q.stats(moments="mvk"))
  z = _draws(name)
  assert abs(z.mean() - mean) < NUM_STANDARD_ERRORS * np.sqrt(var / NUM_DRAWS)
  # Var(sample variance) ~= (mu_4 - var^2) / N, mu_4 = (kurtosis + 3) var^2.
  var_standard_error = var * np.sqrt((excess_kurtosis + 2.0) / NUM_DRAWS)
  assert abs(z.var(ddof=1) - var) < NUM_STANDARD_ERRORS * var_standard_error


def test_positive_family_samples_are_positive():
  z = _draws("lognormal")
  assert np.all(z > 0)
  assert families.FAMILIES["lognormal"].support == "positive"


# (loc, log_scale) pairs: at the prior, near it, and far from it both ways.
KL_PARAMS = np.array(
    [[0.0, 0.0], [0.05, -0.03], [1.3, 0.0], [-0.8, -1.2], [0.4, 0.9],
     [-2.0, 0.5]])


@pytest.mark.parametrize("name", CLOSED_FORM_FAMILIES)
def test_closed_form_kl_matches_quadrature(name, x64):
  family = families.FAMILIES[name]
  kl = np.asarray(family.kl_to_prior(
      families.Params(jnp.asarray(KL_PARAMS[:, 0]),
                      jnp.asarray(KL_PARAMS[:, 1]))))
  q = scipy_distribution(name, KL_PARAMS[:, 0], KL_PARAMS[:, 1])
  prior = scipy_distribution(name, 0.0, 0.0)

  def integrand(z):  # q(z) log(q(z) / p(z)) for every pair, [6]
    log_q = q.logpdf(z)
    with np.errstate(all="ignore"):
      value = np.exp(log_q) * (log_q - prior.logpdf(z))
    return np.where(log_q > -700.0, value, 0.0)  # 0 log 0 = 0

  if name == "cauchy":
    # Too heavy-tailed for a finite z-interval: integrate in the quantile
    # domain, KL = int_0^1 log(q / p)(F^{-1}(u)) du, where the integrand is
    # bounded and smooth for the Cauchy.
    def quantile_integrand(u):
      z = q.ppf(u)
      return q.logpdf(z) - prior.logpdf(z)
    reference, _ = integrate.quad_vec(
        quantile_integrand, 0.0, 1.0, epsabs=1e-12, epsrel=1e-10)
  else:
    # All pairs at once over one interval holding all but 1e-15 of each q's
    # mass, with breakpoints at the kinks (z = 0 and z = loc for the Laplace).
    lower = np.min(q.ppf(1e-15))
    upper = np.max(q.ppf(1.0 - 1e-15))
    kinks = [point for point in (0.0, *KL_PARAMS[:, 0])
             if lower < point < upper]
    reference, _ = integrate.quad_vec(
        integrand, lower, upper, points=kinks, epsabs=1e-12, epsrel=1e-10)
  np.testing.assert_allclose(kl, reference, rtol=1e-7, atol=1e-9)
  assert kl[0] == 0.0  # exactly, at the prior itself
  assert np.all(kl[1:] > 0)


@pytest.mark.parametrize("name", CLOSED_FORM_FAMILIES)
def test_closed_form_kl_matches_monte_carlo(name, x64):
  family = families.FAMILIES[name]
  loc = jnp.asarray(KL_PARAMS[:, 0])
  log_scale = jnp.asarray(KL_PARAMS[:, 1])
  kl = np.asarray(family.kl_to_prior(families.Params(loc, log_scale)))
  z = np.asarray(families.sample(
      name, _key(4), loc, log_scale, num_samples=NUM_DRAWS))
  q = scipy_distribution(name, KL_PARAMS[:, 0], KL_PARAMS[:, 1])
  prior = scipy_distribution(name, 0.0, 0.0)
  log_ratio = q.logpdf(z) - prior.logpdf(z)  # [N, 6], scipy only
  standard_error = log_ratio.std(0, ddof=1) / np.sqrt(NUM_DRAWS)
  np.testing.assert_array_less(
      np.abs(log_ratio.mean(0) - kl), NUM_STANDARD_ERRORS * standard_error
      + 1e-12)


def test_laplace_kl_formula_by_hand(x64):
  # The brief's form b exp(-|m| / b) + |m| - log b - 1, evaluated naively.
  loc, log_scale = _random_params(5, shape=(20,))
  scale = np.exp(log_scale)
  naive = scale * np.exp(-np.abs(loc) / scale) + np.abs(loc) - log_scale - 1
  got = families.FAMILIES["laplace"].kl_to_prior(
      families.Params(jnp.asarray(loc), jnp.asarray(log_scale)))
  np.testing.assert_allclose(got, naive, rtol=1e-10, atol=1e-12)


def test_cauchy_kl_formula_by_hand(x64):
  # log(((s1 + s2)^2 + (m1 - m2)^2) / (4 s1 s2)) with (m2, s2) = (0, 1).
  loc, log_scale = _random_params(6, shape=(20,))
  scale = np.exp(log_scale)
  naive = np.log(((scale + 1) ** 2 + loc**2) / (4 * scale))
  got = families.FAMILIES["cauchy"].kl_to_prior(
      families.Params(jnp.asarray(loc), jnp.asarray(log_scale)))
  np.testing.assert_allclose(got, naive, rtol=1e-10, atol=1e-12)


def test_kl_is_accurate_near_the_prior_in_float32():
  # Collapsed latents sit at the prior, where a naive formula returns
  # rounding noise (or negative values); these forms keep ~1e-6 relative error.
  for name in CLOSED_FORM_FAMILIES:
    family = families.FAMILIES[name]
    kl_32 = family.kl_to_prior(families.Params(
        jnp.float32(1e-3), jnp.float32(-2e-3)))
    with jax.enable_x64(True):
      kl_64 = family.kl_to_prior(families.Params(
          jnp.float64(1e-3), jnp.float64(-2e-3)))
    assert kl_32 > 0, name
    np.testing.assert_allclose(kl_32, kl_64, rtol=1e-3, err_msg=name)


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_samples_and_their_gradients_are_finite_at_extreme_noise(name):
  # float32, the training dtype. Uniform noise exactly 0 and 1 exercises the
  # clamp; normal noise of +-9 sigma the tails.
  family = families.FAMILIES[name]
  if family.noise is families.FAMILIES["gaussian"].noise:
    noise = jnp.array([-9.0, -1.0, 0.0, 1e-30, 1.0, 9.0], jnp.float32)
  else:
    noise = jnp.array([0.0, 1e-30, 0.25, 0.5, 0.75, 1.0], jnp.float32)
  loc = jnp.array([0.0, 0.3, -2.0, 1.0, 0.0, -0.5], jnp.float32)
  log_scale = jnp.array([0.0, -3.0, 1.0, 0.0, -0.5, 2.0], jnp.float32)

  def objectives(loc, log_scale):
    params = families.Params(loc, log_scale)
    terms = [family.sample_from_noise(params, noise),
             family.log_prob_from_noise(params, noise),
             family.prior_log_prob_from_noise(params, noise)]
    if family.has_closed_form_kl:
      terms.append(family.kl_to_prior(params))
    return jnp.stack([jnp.sum(t) for t in terms])

  values, jacobian = jax.jit(lambda *args: (
      objectives(*args), jax.jacrev(objectives, argnums=(0, 1))(*args)))(
          loc, log_scale)
  assert np.all(np.isfinite(values))
  for block in jacobian:
    assert np.all(np.isfinite(block))
  z = family.sample_from_noise(families.Params(loc, log_scale), noise)
  assert np.all(np.isfinite(z))
  # Symmetric clamping: u = 0 and u = 1 map to mirror-image quantiles.
  if name in ("laplace", "logistic", "cauchy"):
    standard = family.sample_from_noise(
        families.Params(jnp.float32(0.0), jnp.float32(0.0)),
        jnp.array([0.0, 1.0], jnp.float32))
    assert standard[0] == -standard[1] and standard[1] > 10


# ----------------------------------------------------------------------------
# The generic estimators.


def _toy_log_likelihood(z: jax.Array) -> jax.Array:
  """A smooth log p(x|z) for a fixed x, [L, B, J] -> [L, B]."""
  weights = jnp.linspace(0.5, -1.0, z.shape[-1])
  return -0.5 * jnp.sum(jnp.square(jnp.tanh(z) - weights), axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _gaussian_family_and_estimators(num_samples, rng, mean, log_var):
  """Both implementations of A, B and the IWAE bound: {name: (family, ref)}."""
  results = {}
  for estimator in ("A", "B"):
    results[estimator] = (
        families.elbo_terms_family(
            "gaussian", estimator, rng, mean, 0.5 * log_var,
            _toy_log_likelihood, num_samples),
        estimators.elbo_terms(
            estimator, rng, mean, log_var, _toy_log_likelihood, num_samples))
  results["iwae"] = (
      {"bound": families.iwae_bound_family(
          "gaussian", rng, mean, 0.5 * log_var, _toy_log_likelihood,
          num_samples)},
      {"bound": estimators.iwae_bound(
          rng, mean, log_var, _toy_log_likelihood, num_samples)})
  return results


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gaussian_family_equals_estimators(dtype):
  with jax.enable_x64(dtype == "float64"):
    mean, log_var = (jnp.asarray(a, dtype) for a in _random_params(9))
    results = _gaussian_family_and_estimators(
        7, _key(10), mean, log_var)
  rtol = 1e-12 if dtype == "float64" else 1e-5
  assert results["A"][0]["z"].shape == (7, *mean.shape)
  for name, (got, want) in results.items():
    assert set(got) == set(want)
    for key in want:
      assert got[key].dtype == want[key].dtype == dtype
      np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=rtol,
                                 err_msg=f"{name}: {key}")
  # The same key gives bit-identical samples.
  np.testing.assert_array_equal(results["A"][0]["z"], results["A"][1]["z"])


def test_default_key_gives_the_estimators_gaussian_samples():
  # The training loop's keys are threefry (the default implementation).
  mean, log_var = (jnp.asarray(a, jnp.float32) for a in _random_params(20))
  rng = jax.random.key(21)
  np.testing.assert_array_equal(
      families.sample("gaussian", rng, mean, 0.5 * log_var, num_samples=2),
      distributions.gaussian_sample(rng, mean, log_var, num_samples=2))


NUM_PAIRED_DRAWS = 4000


@functools.partial(jax.jit, static_argnums=0)
def _family_estimates(name, rngs, loc, log_scale):
  """Estimator A, B (where it exists) and the K = 1 bound for each key.

  One compilation per family. Every leaf gets a leading [N] axis, one entry
  per key; A and B on the same key see the same z, so their difference is a
  low-variance paired comparison.
  """
  family = families.FAMILIES[name]

  def one(rng):
    estimates = {
        "A": families.elbo_terms_family(
            name, "A", rng, loc, log_scale, _toy_log_likelihood, 1),
        "iwae": families.iwae_bound_family(
            name, rng, loc, log_scale, _toy_log_likelihood, 1),
    }
    if family.has_closed_form_kl:
      estimates["B"] = families.elbo_terms_family(
          name, "B", rng, loc, log_scale, _toy_log_likelihood, 1)
    return estimates

  return jax.vmap(one)(rngs)


@functools.cache
def _estimates(name: str):
  loc, log_scale = _random_params(13)
  with jax.enable_x64(True):
    estimates = _family_estimates(
        name, jax.random.split(_key(14), NUM_PAIRED_DRAWS), loc, log_scale)
    family = families.FAMILIES[name]
    if family.has_closed_form_kl:
      estimates["kl"] = family.kl_to_prior(families.Params(
          jnp.asarray(loc), jnp.asarray(log_scale)))  # [B, J]
  return loc, log_scale, jax.tree.map(np.asarray, estimates)


@pytest.mark.parametrize("name", ALL_FAMILIES)
def test_elbo_terms_family_are_consistent(name):
  loc, log_scale, estimates = _estimates(name)
  family = families.FAMILIES[name]
  num, (batch, num_latents) = NUM_PAIRED_DRAWS, loc.shape
  terms = estimates["A"]
  assert terms["elbo"].shape == terms["kl"].shape == (num, batch)
  assert terms["reconstruction"].shape == (num, batch)
  assert terms["kl_per_latent"].shape == (num, batch, num_latents)
  assert terms["z"].shape == (num, 1, batch, num_latents)
  np.testing.assert_allclose(
      terms["elbo"], terms["reconstruction"] - terms["kl"], rtol=1e-12)
  # The terms are scipy's log-ratio and the toy likelihood at z.
  z = terms["z"][:, 0]  # [N, B, J]
  q = scipy_distribution(name, loc, log_scale)
  prior = scipy_distribution(name, 0.0, 0.0)
  log_ratio = q.logpdf(z) - prior.logpdf(z)  # [N, B, J]
  np.testing.assert_allclose(terms["kl"], log_ratio.sum(-1), rtol=1e-9,
                             atol=1e-9)
  weights = np.linspace(0.5, -1.0, num_latents)
  np.testing.assert_allclose(
      terms["reconstruction"], -0.5 * np.sum((np.tanh(z) - weights)**2, -1),
      rtol=1e-12)
  if family.has_closed_form_kl:
    kl = estimates["kl"]
    np.testing.assert_allclose(terms["kl_per_latent"],
                               np.broadcast_to(kl, z.shape), rtol=1e-12)
    terms_b = estimates["B"]
    np.testing.assert_array_equal(terms_b["z"], terms["z"])
    np.testing.assert_array_equal(terms_b["reconstruction"],
                                  terms["reconstruction"])
    np.testing.assert_allclose(
        terms_b["kl"], np.broadcast_to(kl.sum(-1), (num, batch)), rtol=1e-12)
    np.testing.assert_allclose(
        terms_b["elbo"], terms_b["reconstruction"] - terms_b["kl"],
        rtol=1e-12)
  else:
    assert "B" not in estimates
    # With no closed form, the per-latent KL is the Monte Carlo one.
    np.testing.assert_allclose(terms["kl_per_latent"], log_ratio,
                               rtol=1e-9, atol=1e-9)
  # The K = 1 importance-weighted bound is estimator A's ELBO.
  np.testing.assert_allclose(estimates["iwae"], terms["elbo"], rtol=1e-12)


@pytest.mark.parametrize("name", CLOSED_FORM_FAMILIES)
def test_estimators_a_and_b_agree_in_expectation(name):
  _, _, estimates = _estimates(name)
  draws = estimates["A"]["elbo"] - estimates["B"]["elbo"]  # [N, B], paired
  standard_error = draws.std(0, ddof=1) / np.sqrt(draws.shape[0])
  np.testing.assert_array_less(np.abs(draws.mean(0)),
                               NUM_STANDARD_ERRORS * standard_error)


def test_distributions_oracle_agrees_for_the_gaussian(x64):
  # Cross-check the Gaussian family's KL against avb.distributions' own.
  mean, log_var = _random_params(19)
  got = families.FAMILIES["gaussian"].kl_to_prior(
      families.Params(jnp.asarray(mean), jnp.asarray(0.5 * log_var)))
  np.testing.assert_allclose(
      got, distributions.kl_to_standard_normal(mean, log_var), rtol=1e-12)
