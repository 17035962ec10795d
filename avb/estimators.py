"""Monte Carlo estimators of the ELBO and of log p(x) for AEVB.

The SGVB estimators A and B of Kingma & Welling (2013, eqs. 6 and 7), an
importance-sampled estimate of the marginal log-likelihood, and per-example
gradients. The decoder comes in as a function, `log_likelihood_fn(z) -> log
p(x|z)` with z: [L, B, J] -> [L, B], closing over x and the decoder parameters,
so everything here stays pure and independent of the model. The encoder comes in
as its outputs `mean`, `log_var`: [B, J] of the diagonal Gaussian q(z|x); the
prior is p(z) = N(0, I).

All estimators return per-example values ([B]); the caller averages.
"""
from collections.abc import Callable
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp

from avb import distributions

LogLikelihoodFn = Callable[[jax.Array], jax.Array]


def _check_num_samples(num_samples: int, name: str = "num_samples") -> int:
  """Returns `num_samples` as an int, or raises: it sets static shapes."""
  try:
    value = operator.index(num_samples)
  except TypeError:
    value = 0
  if value < 1:
    raise ValueError(f"{name} must be a positive int, got {num_samples!r}.")
  return value


def _posterior_log_prob_from_noise(
    noise: jax.Array, log_var: jax.Array) -> jax.Array:
  """log q(z|x) at z = mean + exp(log_var / 2) * noise, summed over latents.

  Equal in value and gradient to `diag_gaussian_log_prob(z, mean, log_var)`,
  but written in terms of the noise it avoids the cancellation in (z - mean)
  when the posterior variance is tiny.

  Args:
    noise: the standard normal draws z was made from, [..., B, J].
    log_var: posterior log-variance, [B, J].

  Returns:
    log q(z|x), [..., B].
  """
  return -0.5 * jnp.sum(
      distributions.LOG_2PI + log_var + jnp.square(noise), axis=-1)


def _draw(rng: jax.Array, mean: jax.Array, log_var: jax.Array,
          num_samples: int) -> tuple[jax.Array, jax.Array]:
  """Noise and z for L samples; z equals `gaussian_sample(rng, ..., L)`."""
  noise = jax.random.normal(
      rng, (num_samples, *mean.shape), dtype=jnp.result_type(mean))  # [L, B, J]
  z = distributions.gaussian_sample_from_noise(
      noise, mean, log_var)  # [L, B, J]
  return noise, z


def sgvb_a(
    rng: jax.Array,
    mean: jax.Array,
    log_var: jax.Array,
    log_likelihood_fn: LogLikelihoodFn,
    num_samples: int = 1,
) -> dict[str, jax.Array]:
  """SGVB estimator A (paper eq. 6): all three terms by Monte Carlo.

  ELBO ~= 1/L sum_l [log p(x|z_l) + log p(z_l) - log q(z_l|x)], with
  z_l = mean + exp(log_var / 2) * eps_l, eps_l ~ N(0, I). Unbiased for the ELBO;
  with q equal to the exact posterior every summand is log p(x), so its variance
  is zero.

  Args:
    rng: PRNG key; the same key gives the same z as `sgvb_b` and as
      `distributions.gaussian_sample(rng, mean, log_var, num_samples)`.
    mean: mean of q(z|x), [B, J].
    log_var: log-variance of q(z|x), [B, J].
    log_likelihood_fn: z [L, B, J] -> log p(x|z) [L, B].
    num_samples: L, the number of samples per example.

  Returns:
    A dict of per-example terms:
      "elbo": [B], the estimate above.
      "reconstruction": [B], mean over L of log p(x|z_l).
      "kl": [B], the Monte Carlo estimate mean over L of
        log q(z_l|x) - log p(z_l), so that elbo = reconstruction - kl.
      "kl_per_latent": [B, J], the closed-form KL per latent, for logging.
      "z": [L, B, J], the samples.
  """
  num_samples = _check_num_samples(num_samples)
  noise, z = _draw(rng, mean, log_var, num_samples)
  log_likelihood = log_likelihood_fn(z)  # [L, B]
  log_prior = distributions.standard_normal_log_prob(z)  # [L, B]
  log_posterior = _posterior_log_prob_from_noise(noise, log_var)  # [L, B]
  reconstruction = jnp.mean(log_likelihood, axis=0)  # [B]
  kl = jnp.mean(log_posterior - log_prior, axis=0)  # [B]
  return {
      "elbo": reconstruction - kl,  # [B]
      "reconstruction": reconstruction,
      "kl": kl,
      "kl_per_latent": distributions.kl_to_standard_normal(mean, log_var),
      "z": z,
  }


def sgvb_b(
    rng: jax.Array,
    mean: jax.Array,
    log_var: jax.Array,
    log_likelihood_fn: LogLikelihoodFn,
    num_samples: int = 1,
) -> dict[str, jax.Array]:
  """SGVB estimator B (paper eq. 7): closed-form KL, Monte Carlo reconstruction.

  ELBO ~= -KL(q(z|x) || N(0, I)) + 1/L sum_l log p(x|z_l). Same expectation as
  estimator A, usually lower variance because the KL needs no sampling.

  Args:
    rng: PRNG key; the same key gives the same z as `sgvb_a`.
    mean: mean of q(z|x), [B, J].
    log_var: log-variance of q(z|x), [B, J].
    log_likelihood_fn: z [L, B, J] -> log p(x|z) [L, B].
    num_samples: L, the number of samples per example.

  Returns:
    A dict of per-example terms:
      "elbo": [B], the estimate above.
      "reconstruction": [B], mean over L of log p(x|z_l).
      "kl": [B], the closed-form KL.
      "kl_per_latent": [B, J], the closed-form KL per latent.
      "z": [L, B, J], the samples.
  """
  num_samples = _check_num_samples(num_samples)
  _, z = _draw(rng, mean, log_var, num_samples)
  reconstruction = jnp.mean(log_likelihood_fn(z), axis=0)  # [B]
  kl_per_latent = distributions.kl_to_standard_normal(mean, log_var)  # [B, J]
  kl = jnp.sum(kl_per_latent, axis=-1)  # [B]
  return {
      "elbo": reconstruction - kl,  # [B]
      "reconstruction": reconstruction,
      "kl": kl,
      "kl_per_latent": kl_per_latent,
      "z": z,
  }


ESTIMATORS = {"A": sgvb_a, "B": sgvb_b}


def elbo_terms(
    estimator: str,
    rng: jax.Array,
    mean: jax.Array,
    log_var: jax.Array,
    log_likelihood_fn: LogLikelihoodFn,
    num_samples: int = 1,
) -> dict[str, jax.Array]:
  """Runs the SGVB estimator named `estimator` ("A" or "B").

  Args:
    estimator: a key of `ESTIMATORS`.
    rng: PRNG key.
    mean: mean of q(z|x), [B, J].
    log_var: log-variance of q(z|x), [B, J].
    log_likelihood_fn: z [L, B, J] -> log p(x|z) [L, B].
    num_samples: L, the number of samples per example.

  Returns:
    The estimator's dict of per-example terms (see `sgvb_a`, `sgvb_b`).

  Raises:
    ValueError: for an unknown estimator name.
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"Unknown estimator {estimator!r}; expected one of "
                     f"{tuple(ESTIMATORS)}.")
  return ESTIMATORS[estimator](
      rng, mean, log_var, log_likelihood_fn, num_samples=num_samples)


def importance_log_likelihood(
    rng: jax.Array,
    mean: jax.Array,
    log_var: jax.Array,
    log_likelihood_fn: LogLikelihoodFn,
    num_samples: int,
    chunk_size: int = 500,
    draw: Callable[[jax.Array], tuple[jax.Array, jax.Array]] | None = None,
) -> jax.Array:
  """Importance-sampled log p(x) with q(z|x) as the proposal.

  log p(x) ~= log 1/K sum_k exp(log p(x|z_k) + log p(z_k) - log q(z_k|x)),
  z_k ~ q(z|x). A lower bound in expectation that tightens as K grows (Burda et
  al. 2016), and exact for any K when q is the true posterior.

  The K samples are taken in chunks under `lax.scan`, each chunk folded into a
  running logsumexp, so memory is bounded by one chunk of decoder passes however
  large K is, under jax.grad too. Sample k uses its own key,
  `jax.random.split(rng, num_samples)[k]`, drawing noise of shape [B, J]; so the
  samples, and hence the result up to float rounding, do not depend on
  chunk_size.

  The chunks are balanced: ceil(K / chunk_size) of them, each of
  ceil(K / num_chunks) <= chunk_size samples. When that overshoots K, the last
  chunk is padded with repeated keys whose log-weights are masked to -inf, which
  wastes fewer than num_chunks decoder passes and keeps a single traced decoder
  call (a separate remainder call would double compile time).

  Args:
    rng: PRNG key.
    mean: mean of q(z|x), [B, J].
    log_var: log-variance of q(z|x), [B, J].
    log_likelihood_fn: z [C, B, J] -> log p(x|z) [C, B], called (traced) once
      with C the balanced chunk size described above.
    num_samples: K; static under jit.
    chunk_size: the most samples per decoder call; static under jit.
    draw: for a non-Gaussian q: key -> (z [B, J], log p(z) - log q(z|x) [B]);
      None draws from the diagonal Gaussian (mean, log_var).

  Returns:
    The estimate of log p(x), [B].
  """
  num_samples = _check_num_samples(num_samples)
  chunk_size = _check_num_samples(chunk_size, "chunk_size")
  num_chunks = -(-num_samples // chunk_size)
  chunk_size = -(-num_samples // num_chunks)
  num_padded = num_chunks * chunk_size  # in [K, K + num_chunks)
  dtype = jnp.result_type(mean)

  keys = jax.random.split(rng, num_samples)  # [K] keys
  if num_padded > num_samples:
    # Pad with existing keys rather than splitting num_padded keys, because
    # split's output depends on the count and would change every sample.
    keys = jnp.concatenate([keys, keys[:num_padded - num_samples]])
  keys = keys.reshape((num_chunks, chunk_size, *keys.shape[1:]))
  is_real = (jnp.arange(num_padded) < num_samples).reshape(
      num_chunks, chunk_size)  # [num_chunks, C]

  # Rematerialised so that differentiating the estimate (e.g. for an
  # importance-weighted objective) also keeps only one chunk of activations
  # alive, instead of scan saving every chunk's for the backward pass.
  @jax.checkpoint
  def step(running: jax.Array, chunk: tuple[jax.Array, jax.Array]):
    chunk_keys, chunk_is_real = chunk  # [C] keys, [C]
    if draw is None:
      noise = jax.vmap(
          lambda key: jax.random.normal(key, mean.shape, dtype=dtype))(
              chunk_keys)  # [C, B, J]
      z = distributions.gaussian_sample_from_noise(noise, mean, log_var)
      log_prior_ratio = (distributions.standard_normal_log_prob(z)
                         - _posterior_log_prob_from_noise(noise, log_var))
    else:
      z, log_prior_ratio = jax.vmap(draw)(chunk_keys)  # [C, B, J], [C, B]
    log_weights = log_likelihood_fn(z) + log_prior_ratio  # [C, B]
    log_weights = jnp.where(
        chunk_is_real[:, None], log_weights.astype(dtype), -jnp.inf)
    # logaddexp of two max-stabilised logsumexps is itself max-stabilised, and
    # it treats the initial -inf exactly. Every chunk holds a real sample, so
    # padding alone never turns a chunk's logsumexp into -inf.
    running = jnp.logaddexp(
        running, jax.nn.logsumexp(log_weights, axis=0))  # [B]
    return running, None

  running = jnp.full(mean.shape[:-1], -jnp.inf, dtype=dtype)  # [B]
  running, _ = jax.lax.scan(step, running, (keys, is_real))
  return running - math.log(num_samples)  # [B]


def per_example_grads(
    loss_fn: Callable[..., jax.Array], params: Any, *args: Any) -> Any:
  """Gradients of a per-example loss for every example of a batch.

  Computed as `jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0, ...))`: one
  backward pass per example, vectorised, no Python loop.

  Each example must draw its own randomness: pass a batch of keys (e.g.
  `jax.random.split(rng, B)`) as one of `args` and let `loss_fn` use its own.
  A single key closed over by `loss_fn` would give every example the same noise.

  Args:
    loss_fn: `loss_fn(params, *example_args) -> scalar` for ONE example, each
      argument without the batch axis.
    params: pytree of parameters, shared across the batch.
    *args: per-example arguments, each with a leading batch axis [B, ...].

  Returns:
    A pytree shaped like `params` with every leaf given a leading [B] axis.
  """
  in_axes = (None,) + (0,) * len(args)
  return jax.vmap(jax.grad(loss_fn), in_axes=in_axes)(params, *args)


def iwae_bound(
    rng: jax.Array,
    mean: jax.Array,
    log_var: jax.Array,
    log_likelihood_fn: LogLikelihoodFn,
    num_samples: int,
) -> jax.Array:
  """The K-sample importance-weighted bound of Burda et al. (2016).

  L_K = log 1/K sum_k exp(log p(x|z_k) + log p(z_k) - log q(z_k|x)),
  z_k ~ q(z|x). E[L_K] <= E[L_{K+1}] <= log p(x), and L_1 is estimator A's
  ELBO: with the same key and K = 1 this returns `sgvb_a(...)["elbo"]`.

  It is the same quantity as `importance_log_likelihood`, but shaped as a
  training objective: one decoder call on all K samples (no chunking, so
  memory grows with K), and the samples are the ones
  `sgvb_a(rng, ..., num_samples=K)` draws, not those of per-sample keys.

  Args:
    rng: PRNG key.
    mean: mean of q(z|x), [B, J].
    log_var: log-variance of q(z|x), [B, J].
    log_likelihood_fn: z [K, B, J] -> log p(x|z) [K, B].
    num_samples: K, the number of importance samples per example.

  Returns:
    The bound, [B].
  """
  num_samples = _check_num_samples(num_samples)
  noise, z = _draw(rng, mean, log_var, num_samples)
  log_weights = (
      log_likelihood_fn(z)
      + distributions.standard_normal_log_prob(z)
      - _posterior_log_prob_from_noise(noise, log_var))  # [K, B]
  return jax.nn.logsumexp(log_weights, axis=0) - math.log(num_samples)  # [B]


SCORE_FUNCTION_BASELINES = ("leave_one_out",)


def score_function_surrogate(
    rng: jax.Array,
    mean: jax.Array,
    log_var: jax.Array,
    f: Callable[[jax.Array], jax.Array],
    num_samples: int,
    baseline: str | float | jax.Array | None = None,
) -> jax.Array:
  """A surrogate whose gradient is the score-function estimate of grad E_q[f].

  The score-function (REINFORCE, likelihood-ratio) identity
  grad_phi E_q[f(z)] = E_q[(f(z) - b) grad_phi log q(z|x)] holds for any b that
  does not depend on z; it needs no gradient of f with respect to z, but its
  variance is typically far larger than the reparameterized estimate's
  (paper section 2.3 motivates SGVB with exactly this). The surrogate is

    S = 1/L sum_l [f(z_l) + sg(f(z_l) - b_l) (log q(z_l) - sg(log q(z_l)))]

  with sg = stop_gradient and the z_l themselves stopped. Its value is the
  Monte Carlo estimate of E_q[f] (the second sum is exactly 0); its gradient
  with respect to (mean, log_var) is 1/L sum_l (f(z_l) - b_l) grad log q(z_l);
  its gradient with respect to anything f closes over (e.g. decoder
  parameters) is 1/L sum_l grad f(z_l) at fixed z_l, which is unbiased too.
  f must not depend on (mean, log_var) other than through z; add terms that
  do, such as an analytic -KL, to the surrogate separately.

  Args:
    rng: PRNG key; the same key gives the same z as `sgvb_a`.
    mean: mean of q(z|x), [B, J].
    log_var: log-variance of q(z|x), [B, J].
    f: z [L, B, J] -> [L, B], e.g. a log-likelihood.
    num_samples: L.
    baseline: the control variate b subtracted from f:
      None: b = 0.
      a float or an array broadcasting against [L, B] (e.g. a per-example [B]
        baseline learned by a separate loss): used as given, under
        stop_gradient.
      "leave_one_out": b_l = the mean of f over the other L - 1 samples of the
        same example. Independent of z_l, hence unbiased; needs L >= 2.
        Equivalent to L / (L - 1) times centring f on its sample mean.

  Returns:
    The per-example surrogate, [B].

  Raises:
    ValueError: for an unknown baseline name, or "leave_one_out" with L < 2.
  """
  num_samples = _check_num_samples(num_samples)
  if isinstance(baseline, str):
    if baseline not in SCORE_FUNCTION_BASELINES:
      raise ValueError(
          f"Unknown baseline {baseline!r}; expected None, a number or array, "
          f"or one of {SCORE_FUNCTION_BASELINES}.")
    if num_samples < 2:
      raise ValueError(
          "The leave-one-out baseline needs num_samples >= 2, got "
          f"{num_samples}.")
  _, z = _draw(rng, mean, log_var, num_samples)
  z = jax.lax.stop_gradient(z)  # [L, B, J]
  values = f(z)  # [L, B]
  if baseline is None:
    centred = values
  elif isinstance(baseline, str):  # "leave_one_out"
    others = jnp.sum(values, axis=0) - values  # [L, B]
    centred = values - others / (num_samples - 1)
  else:
    centred = values - jnp.asarray(baseline)
  weights = jax.lax.stop_gradient(centred)  # [L, B]
  log_posterior = distributions.diag_gaussian_log_prob(
      z, mean, log_var)  # [L, B]
  score_term = weights * (
      log_posterior - jax.lax.stop_gradient(log_posterior))  # [L, B], value 0
  return jnp.mean(values + score_term, axis=0)  # [B]


def gradient_variance_stats(per_example_grads_tree: Any) -> dict[str, Any]:
  """Spread of N gradient estimates, per leaf and over the whole tree.

  Each leaf holds N >= 2 estimates g_1..g_N of the same gradient on a leading
  axis (e.g. `per_example_grads` of one example with N keys, or N draws of a
  stochastic estimator). With g_bar = 1/N sum_n g_n, over the leaf's elements
  (or, for "total", over all leaves' elements together):

    trace_cov = 1/(N - 1) sum_n ||g_n - g_bar||^2, the trace of the unbiased
      sample covariance: the total variance of one estimate;
    mean_sq_norm = 1/N sum_n ||g_n||^2, the second moment; equal to
      ||g_bar||^2 + (N - 1)/N trace_cov;
    mean_norm = ||g_bar||;
    snr = ||g_bar|| / sqrt(trace_cov), the signal-to-noise ratio of one
      estimate (inf or nan when the estimates are all equal).

  Args:
    per_example_grads_tree: a pytree whose leaves are [N, ...] arrays with the
      same N.

  Returns:
    {"per_leaf": {"trace_cov", "mean_sq_norm", "mean_norm", "snr"}, each a
    pytree shaped like the input with a scalar per leaf,
    "total": {"trace_cov", "mean_sq_norm", "mean_norm", "snr"}, scalars}.

  Raises:
    ValueError: for an empty tree, leaves with different N, or N < 2.
  """
  leaves, treedef = jax.tree.flatten(per_example_grads_tree)
  if not leaves:
    raise ValueError("gradient_variance_stats needs at least one leaf.")
  counts = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
  if len(counts) != 1 or None in counts:
    raise ValueError("Every leaf needs the same leading [N] axis, got shapes "
                     f"{[jnp.shape(leaf) for leaf in leaves]}.")
  (num,) = counts
  if num < 2:
    raise ValueError(f"Need N >= 2 estimates for a variance, got N={num}.")

  def leaf_sums(leaf):
    g = jnp.reshape(leaf, (num, -1))
    g = g.astype(jnp.promote_types(g.dtype, jnp.float32))  # [N, P]
    mean = jnp.mean(g, axis=0)  # [P]
    # Centred before squaring: the textbook E[g^2] - E[g]^2 cancels badly
    # when the signal dominates.
    sum_sq_dev = jnp.sum(jnp.square(g - mean))
    return (sum_sq_dev / (num - 1), jnp.sum(jnp.square(g)) / num,
            jnp.sum(jnp.square(mean)))

  sums = [leaf_sums(leaf) for leaf in leaves]

  def stats(trace_cov, mean_sq_norm, sq_mean_norm):
    mean_norm = jnp.sqrt(sq_mean_norm)
    return {"trace_cov": trace_cov, "mean_sq_norm": mean_sq_norm,
            "mean_norm": mean_norm, "snr": mean_norm / jnp.sqrt(trace_cov)}

  per_leaf = [stats(*s) for s in sums]
  total = stats(*(sum(s[i] for s in sums) for i in range(3)))
  return {
      "per_leaf": {
          key: jax.tree.unflatten(treedef, [p[key] for p in per_leaf])
          for key in total},
      "total": total,
  }
