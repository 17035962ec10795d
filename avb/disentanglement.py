"""Disentanglement metrics on data with known generative factors.

Four scores of how well a representation lines up with ground-truth factors:

* `beta_vae_score`: Higgins et al. (2017), the accuracy of a linear classifier
  that names which factor was held fixed from mean |z1 - z2| over pairs.
* `factor_vae_score`: Kim & Mnih (2018), the accuracy of a majority vote that
  names the fixed factor from the code dimension of least (normalised)
  variance.
* `mig_score`: Chen et al. (2018), the mutual information gap: per factor, the
  gap between the two code dimensions most informative about it, over the
  factor's entropy.
* `dci_score`: Eastwood & Williams (2018), disentanglement, completeness and
  informativeness from the importance of each code dimension for predicting
  each factor.

Design. A metric sees the model only through `represent`, a function from
factor classes (int [n, F]) to codes (float [n, K]), plus the number of classes
of each factor and a numpy Generator. For a trained model that is
`image_representation(encoder_mean, dataset.images_for)`; the known-answer
tests instead pass functions of the classes themselves (the factors as the
code, noise, a rotation of the factors), so the metrics are checked without
any images or training. `mig_from_codes` and `dci_from_codes` take arrays for
codes that are already computed.

Factors with a single class (dSprites' color) carry no information and are
left out: "the factors" below are the varying ones, F' of them (5 for
dSprites). Chance levels: 1 / F' for the two classifier scores (0.2 on
dSprites), 0 for MIG and DCI disentanglement (up to finite-sample bias).

All sampling is vectorised: every factor vector a metric needs is drawn at
once, and `represent` is called on chunks of `encode_chunk` rows, so a
representation backed by images never holds more than one chunk of them.
"""

from __future__ import annotations

from typing import Callable, Sequence

from absl import logging
import numpy as np

Represent = Callable[[np.ndarray], np.ndarray]

IMPORTANCE_MODELS = ("random_forest", "gradient_boosting", "lasso")
_DEFAULT_CHUNK = 4096


class MetricError(ValueError):
  """A metric input that cannot work; the message names it and the fix."""


# ----------------------------------------------------------------------------
# Shared checks and sampling.


def _check_count(name: str, value: object, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise MetricError(f"{name}={value!r} must be an int >= {minimum}")
  if value < minimum:
    raise MetricError(f"{name}={value} must be >= {minimum}")
  return int(value)


def _check_sizes(factor_sizes: Sequence[int]) -> np.ndarray:
  sizes = np.asarray(factor_sizes)
  if sizes.ndim != 1 or sizes.size == 0 or not np.issubdtype(
      sizes.dtype, np.integer) or np.any(sizes < 1):
    raise MetricError(
        f"factor_sizes={factor_sizes!r} must be a non-empty list of ints >= 1 "
        "(classes per factor)")
  if np.sum(sizes > 1) < 1:
    raise MetricError(
        f"factor_sizes={list(sizes)} has no factor with more than one class; "
        "there is nothing to disentangle")
  return sizes.astype(np.int64)


def varying_factors(factor_sizes: Sequence[int]) -> np.ndarray:
  """Indices of the factors with more than one class (the ones scored)."""
  return np.flatnonzero(_check_sizes(factor_sizes) > 1)


def _check_rng(rng: object) -> np.random.Generator:
  if not isinstance(rng, np.random.Generator):
    raise MetricError(
        f"rng must be a numpy Generator (np.random.default_rng(seed)), got "
        f"{type(rng).__name__}")
  return rng


def _check_codes(codes: object, num: int, what: str) -> np.ndarray:
  """Codes as float64 [num, K], refusing wrong shapes and non-finite values."""
  array = np.asarray(codes)
  if array.ndim != 2 or array.shape[0] != num or array.shape[1] < 1:
    raise MetricError(
        f"{what} has shape {array.shape}; expected [{num}, K] with K >= 1 "
        "(one code row per factor vector)")
  if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
    raise MetricError(f"{what} has dtype {array.dtype}; expected numbers")
  array = array.astype(np.float64, copy=False)
  if not np.all(np.isfinite(array)):
    bad = int(np.sum(~np.isfinite(array)))
    raise MetricError(
        f"{what} holds {bad} NaN or infinite value(s); check the encoder "
        "(a diverged model cannot be scored)")
  return array


def _encode(represent: Represent, classes: np.ndarray,
            encode_chunk: int) -> np.ndarray:
  """Codes of classes [n, F], calling `represent` on chunks of rows."""
  if not callable(represent):
    raise MetricError(
        f"represent must be callable (classes [n, F] -> codes [n, K]), got "
        f"{type(represent).__name__}")
  parts = []
  num_codes = None
  for start in range(0, classes.shape[0], encode_chunk):
    chunk = classes[start:start + encode_chunk]
    codes = _check_codes(represent(chunk), chunk.shape[0],
                         f"represent(classes[{start}:{start + len(chunk)}])")
    if num_codes is None:
      num_codes = codes.shape[1]
    elif codes.shape[1] != num_codes:
      raise MetricError(
          f"represent returned {codes.shape[1]} code dimensions for rows "
          f"from {start}, {num_codes} before; it must be a fixed function")
    parts.append(codes)
  return np.concatenate(parts)


def _sample(rng: np.random.Generator, shape: tuple[int, ...],
            sizes: np.ndarray) -> np.ndarray:
  """Uniform factor classes, int64 [*shape, F]."""
  return rng.integers(0, sizes, size=(*shape, sizes.size), dtype=np.int64)


def _sklearn_seed(rng: np.random.Generator) -> int:
  return int(rng.integers(2**31 - 1))


def image_representation(encode: Callable[[np.ndarray], np.ndarray],
                         images_for: Callable[[np.ndarray], np.ndarray],
                         batch_size: int = 256) -> Represent:
  """A `represent` that renders or reads images and encodes them.

  Args:
    encode: float32 images [b, H, W] in [0, 1] -> codes [b, K], e.g. the
      encoder mean of a trained model.
    images_for: factor classes [b, F] -> uint8 images [b, H, W] (0/1 or
      0..255 are both fine if `encode` expects what the images hold), e.g.
      `dsprites.DSprites.images_for`.
    batch_size: images per call to `encode`.

  Returns:
    classes [n, F] -> float64 codes [n, K].
  """
  batch_size = _check_count("batch_size", batch_size)

  def represent(classes: np.ndarray) -> np.ndarray:
    parts = []
    for start in range(0, classes.shape[0], batch_size):
      images = np.asarray(images_for(classes[start:start + batch_size]))
      parts.append(np.asarray(encode(images.astype(np.float32)), np.float64))
    return np.concatenate(parts)

  return represent


# ----------------------------------------------------------------------------
# beta-VAE metric (Higgins et al. 2017).


def beta_vae_score(represent: Represent, factor_sizes: Sequence[int],
                   rng: np.random.Generator, *, batch_size: int = 64,
                   num_train: int = 10_000, num_eval: int = 5_000,
                   encode_chunk: int = _DEFAULT_CHUNK) -> dict[str, object]:
  """The beta-VAE disentanglement metric.

  Each classifier point: draw a factor y uniformly; draw `batch_size` (L)
  pairs of factor vectors that share y's class and are otherwise independent;
  the point is mean_l |z(v1_l) - z(v2_l)| with label y. A linear classifier
  (multinomial logistic regression on standardised inputs, a low-capacity
  linear model as the paper asks) is trained on `num_train` points and scored
  on `num_eval` new ones.

  Defaults: L = 64 and 10,000 / 5,000 points, as disentanglement_lib
  (Locatello et al. 2019) runs this metric; Higgins et al. average over a
  batch of L pairs per point and train a linear classifier, but the exact
  sizes of their appendix could not be checked offline. Standardising the
  inputs makes the score independent of each code dimension's scale; the
  paper's classifier had no such step.

  Args:
    represent: factor classes [n, F] -> codes [n, K].
    factor_sizes: classes per factor, length F.
    rng: numpy Generator; the score is a deterministic function of its state.
    batch_size: L, pairs averaged per classifier point.
    num_train: classifier training points.
    num_eval: held-out points for the score.
    encode_chunk: rows per call to `represent`.

  Returns:
    {"score": held-out accuracy, "train_accuracy", "eval_accuracy",
     "chance": 1 / F', "num_factors": F'}.
  """
  from sklearn import linear_model, pipeline, preprocessing

  sizes = _check_sizes(factor_sizes)
  rng = _check_rng(rng)
  batch_size = _check_count("batch_size", batch_size)
  num_train = _check_count("num_train", num_train, 2)
  num_eval = _check_count("num_eval", num_eval)
  encode_chunk = _check_count("encode_chunk", encode_chunk)
  factors = varying_factors(sizes)

  num_points = num_train + num_eval
  labels = rng.integers(factors.size, size=num_points)
  fixed = factors[labels]                                   # [P]
  first = _sample(rng, (num_points, batch_size), sizes)     # [P, L, F]
  second = _sample(rng, (num_points, batch_size), sizes)
  points = np.arange(num_points)
  second[points, :, fixed] = first[points, :, fixed]
  codes = _encode(represent,
                  np.concatenate([first, second]).reshape(-1, sizes.size),
                  encode_chunk)
  codes = codes.reshape(2, num_points, batch_size, -1)
  z_diff = np.abs(codes[0] - codes[1]).mean(axis=1)        # [P, K]

  train_labels = labels[:num_train]
  if np.unique(train_labels).size < 2:
    raise MetricError(
        f"num_train={num_train} drew a single factor; raise num_train so the "
        "classifier sees at least two classes")
  classifier = pipeline.make_pipeline(
      preprocessing.StandardScaler(),
      linear_model.LogisticRegression(max_iter=2000))
  classifier.fit(z_diff[:num_train], train_labels)
  train_accuracy = float(classifier.score(z_diff[:num_train], train_labels))
  eval_accuracy = float(classifier.score(z_diff[num_train:],
                                         labels[num_train:]))
  return {
      "score": eval_accuracy,
      "train_accuracy": train_accuracy,
      "eval_accuracy": eval_accuracy,
      "chance": 1.0 / factors.size,
      "num_factors": int(factors.size),
  }


# ----------------------------------------------------------------------------
# FactorVAE metric (Kim & Mnih 2018).


def factor_vae_score(represent: Represent, factor_sizes: Sequence[int],
                     rng: np.random.Generator, *, batch_size: int = 64,
                     num_train: int = 10_000, num_eval: int = 5_000,
                     num_variance_estimate: int = 10_000,
                     min_std: float = 0.05,
                     encode_chunk: int = _DEFAULT_CHUNK) -> dict[str, object]:
  """The FactorVAE disentanglement metric.

  Each code dimension is divided by its standard deviation over
  `num_variance_estimate` random factor vectors; dimensions whose standard
  deviation is below `min_std` count as collapsed (posterior means stuck at
  the prior's) and are dropped. Each vote: fix a factor k at a random class,
  draw `batch_size` vectors, take the variance of each normalised active
  dimension over the batch; the vote is (argmin dimension, k). The classifier
  maps each dimension to the factor it got most training votes for; the score
  is its accuracy on `num_eval` held-out votes.

  Defaults follow disentanglement_lib: batches of 64, 10,000 training and
  5,000 evaluation votes, 10,000 points for the scales. `min_std` is an
  absolute threshold, meant for VAE codes whose prior has unit variance;
  rescaling a dimension below it drops that dimension by design.

  Args:
    represent: factor classes [n, F] -> codes [n, K].
    factor_sizes: classes per factor.
    rng: numpy Generator.
    batch_size: vectors per vote.
    num_train: training votes.
    num_eval: held-out votes.
    num_variance_estimate: points for the per-dimension scales.
    min_std: dimensions with a smaller standard deviation are dropped.
    encode_chunk: rows per call to `represent`.

  Returns:
    {"score", "train_accuracy", "eval_accuracy", "num_active_dims",
     "active_dims" (int [K'] indices), "votes" (int [K', F'] training vote
     counts), "chance": 1 / F', "num_factors": F'}. With no active dimension
     the score is 0.
  """
  sizes = _check_sizes(factor_sizes)
  rng = _check_rng(rng)
  batch_size = _check_count("batch_size", batch_size, 2)
  num_train = _check_count("num_train", num_train)
  num_eval = _check_count("num_eval", num_eval)
  num_variance_estimate = _check_count(
      "num_variance_estimate", num_variance_estimate, 2)
  encode_chunk = _check_count("encode_chunk", encode_chunk)
  if not np.isfinite(min_std) or min_std < 0:
    raise MetricError(f"min_std={min_std!r} must be a finite number >= 0")
  factors = varying_factors(sizes)

  global_codes = _encode(
      represent, _sample(rng, (num_variance_estimate,), sizes), encode_chunk)
  global_std = global_codes.std(axis=0, ddof=1)
  active = np.flatnonzero(global_std >= max(min_std, np.finfo(float).tiny))
  chance = 1.0 / factors.size
  if active.size == 0:
    logging.warning("factor_vae_score: every code dimension has std < %g; "
                    "scoring 0", min_std)
    return {"score": 0.0, "train_accuracy": 0.0, "eval_accuracy": 0.0,
            "num_active_dims": 0, "active_dims": active,
            "votes": np.zeros((0, factors.size), np.int64), "chance": chance,
            "num_factors": int(factors.size)}

  num_votes = num_train + num_eval
  labels = rng.integers(factors.size, size=num_votes)
  fixed = factors[labels]
  classes = _sample(rng, (num_votes, batch_size), sizes)
  fixed_class = rng.integers(0, sizes[fixed])               # [V]
  classes[np.arange(num_votes), :, fixed] = fixed_class[:, None]
  codes = _encode(represent, classes.reshape(-1, sizes.size), encode_chunk)
  codes = codes.reshape(num_votes, batch_size, -1)[:, :, active]
  normalised = codes / global_std[active]
  variances = normalised.var(axis=1, ddof=1)               # [V, K']
  dims = np.argmin(variances, axis=1)

  votes = np.zeros((active.size, factors.size), np.int64)
  np.add.at(votes, (dims[:num_train], labels[:num_train]), 1)
  prediction = np.argmax(votes, axis=1)                    # [K'] -> factor
  train_accuracy = float(votes.max(axis=1).sum() / num_train)
  eval_accuracy = float(np.mean(
      prediction[dims[num_train:]] == labels[num_train:]))
  return {
      "score": eval_accuracy,
      "train_accuracy": train_accuracy,
      "eval_accuracy": eval_accuracy,
      "num_active_dims": int(active.size),
      "active_dims": active,
      "votes": votes,
      "chance": chance,
      "num_factors": int(factors.size),
  }


# ----------------------------------------------------------------------------
# Mutual information gap (Chen et al. 2018).


def discretize(codes: np.ndarray, num_bins: int = 20) -> np.ndarray:
  """Equal-width histogram bin of each entry, per code dimension.

  Args:
    codes: float [n, K].
    num_bins: bins per dimension, spanning its observed [min, max].

  Returns:
    int64 [n, K] in [0, num_bins).
  """
  num_bins = _check_count("num_bins", num_bins)
  binned = np.empty(codes.shape, np.int64)
  for j in range(codes.shape[1]):
    edges = np.histogram_bin_edges(codes[:, j], bins=num_bins)
    binned[:, j] = np.digitize(codes[:, j], edges[1:-1])
  return binned


def _mutual_information(a: np.ndarray, b: np.ndarray) -> float:
  """Plug-in mutual information, in nats, of two int label arrays."""
  _, a = np.unique(a, return_inverse=True)
  _, b = np.unique(b, return_inverse=True)
  num_b = int(b.max()) + 1
  joint = np.bincount(a * num_b + b, minlength=(int(a.max()) + 1) * num_b)
  joint = joint.reshape(-1, num_b) / a.size
  marginal_a = joint.sum(axis=1, keepdims=True)
  marginal_b = joint.sum(axis=0, keepdims=True)
  nonzero = joint > 0
  return float(np.sum(joint[nonzero] * np.log(
      joint[nonzero] / (marginal_a @ marginal_b)[nonzero])))


def _entropy(labels: np.ndarray) -> float:
  """Plug-in entropy, in nats, of an int label array."""
  _, counts = np.unique(labels, return_counts=True)
  p = counts / labels.size
  return float(-np.sum(p * np.log(p)))


def _check_factors(factors: object, num: int, what: str) -> np.ndarray:
  array = np.asarray(factors)
  if array.ndim != 2 or array.shape[0] != num or array.shape[1] < 1:
    raise MetricError(
        f"{what} has shape {array.shape}; expected [{num}, F] factor classes "
        "matching the codes row for row")
  if not np.issubdtype(array.dtype, np.integer):
    raise MetricError(f"{what} has dtype {array.dtype}; expected int classes")
  return array.astype(np.int64, copy=False)


def mig_from_codes(codes: object, factors: object, *,
                   num_bins: int = 20) -> dict[str, object]:
  """MIG of computed codes.

  For each factor k that varies in `factors`: the mutual information between
  k and each discretised code dimension, the gap between the largest two,
  divided by k's entropy; MIG is the mean over factors.

  Args:
    codes: float [n, K].
    factors: int [n, F] ground-truth classes of the same rows.
    num_bins: histogram bins per code dimension.

  Returns:
    {"score", "mig_per_factor" [F'], "mutual_information" [K, F'] (nats),
     "factor_entropy" [F'] (nats), "factors" (indices scored)}.
  """
  num = np.shape(codes)[0] if np.ndim(codes) else 0
  if num < 2:
    raise MetricError(f"MIG needs at least 2 points, got {num}")
  codes = _check_codes(codes, num, "codes")
  factors = _check_factors(factors, num, "factors")
  binned = discretize(codes, num_bins)
  scored = np.array([k for k in range(factors.shape[1])
                     if np.unique(factors[:, k]).size > 1], np.int64)
  if scored.size == 0:
    raise MetricError("every factor is constant in these points; MIG needs "
                      "at least one factor that varies")
  info = np.array([[_mutual_information(binned[:, j], factors[:, k])
                    for k in scored] for j in range(codes.shape[1])])
  entropy = np.array([_entropy(factors[:, k]) for k in scored])
  ranked = np.sort(info, axis=0)[::-1]                     # [K, F']
  second = ranked[1] if ranked.shape[0] > 1 else np.zeros(scored.size)
  gaps = (ranked[0] - second) / entropy
  return {
      "score": float(np.mean(gaps)),
      "mig_per_factor": gaps,
      "mutual_information": info,
      "factor_entropy": entropy,
      "factors": scored,
  }


def mig_score(represent: Represent, factor_sizes: Sequence[int],
              rng: np.random.Generator, *, num_points: int = 10_000,
              num_bins: int = 20,
              encode_chunk: int = _DEFAULT_CHUNK) -> dict[str, object]:
  """The mutual information gap on `num_points` random factor vectors.

  Defaults (10,000 points, 20 bins) follow disentanglement_lib. With 20 bins
  a factor of more than 20 classes cannot be recovered exactly even by a
  perfect code (dSprites' 40 orientations and 32 positions share bins), which
  caps MIG of the ground truth itself near 0.9; pass more bins to lift it.

  Returns:
    As `mig_from_codes`, plus "chance": 0.
  """
  sizes = _check_sizes(factor_sizes)
  rng = _check_rng(rng)
  num_points = _check_count("num_points", num_points, 2)
  encode_chunk = _check_count("encode_chunk", encode_chunk)
  classes = _sample(rng, (num_points,), sizes)
  codes = _encode(represent, classes, encode_chunk)
  result = mig_from_codes(codes, classes[:, varying_factors(sizes)],
                          num_bins=num_bins)
  result["factors"] = varying_factors(sizes)[result["factors"]]
  result["chance"] = 0.0
  return result


# ----------------------------------------------------------------------------
# DCI (Eastwood & Williams 2018).


def _importance_and_informativeness(
    codes_train: np.ndarray, labels_train: np.ndarray,
    codes_test: np.ndarray, labels_test: np.ndarray, model: str,
    num_trees: int, lasso_alpha: float, seed: int) -> tuple[np.ndarray, float,
                                                             float]:
  """Importance of each code dimension for one factor, and fit quality."""
  from sklearn import ensemble, linear_model

  if model == "lasso":
    mean, std = codes_train.mean(0), codes_train.std(0)
    std = np.where(std > 0, std, 1.0)
    target_mean, target_std = labels_train.mean(), labels_train.std()
    target_std = target_std if target_std > 0 else 1.0
    regressor = linear_model.Lasso(alpha=lasso_alpha)
    regressor.fit((codes_train - mean) / std,
                  (labels_train - target_mean) / target_std)
    importance = np.abs(regressor.coef_)
    train = regressor.score((codes_train - mean) / std,
                            (labels_train - target_mean) / target_std)
    test = regressor.score((codes_test - mean) / std,
                           (labels_test - target_mean) / target_std)
    return importance, float(train), float(test)
  if model == "random_forest":
    # All features at every split (max_features=None): a dimension that alone
    # predicts the factor takes every split, so none of the importance leaks
    # to unrelated dimensions through forced random feature subsets.
    classifier = ensemble.RandomForestClassifier(
        n_estimators=num_trees, max_features=None, random_state=seed,
        n_jobs=1)
  else:
    classifier = ensemble.GradientBoostingClassifier(random_state=seed)
  classifier.fit(codes_train, labels_train)
  return (np.asarray(classifier.feature_importances_, np.float64),
          float(classifier.score(codes_train, labels_train)),
          float(classifier.score(codes_test, labels_test)))


def _one_minus_entropy(p: np.ndarray, base: int) -> np.ndarray:
  """1 - H(p) in log base `base`, per row of non-negative weights p."""
  totals = p.sum(axis=1, keepdims=True)
  p = np.divide(p, totals, out=np.zeros_like(p), where=totals > 0)
  if base <= 1:
    return np.ones(p.shape[0])
  logs = np.log(p, out=np.zeros_like(p), where=p > 0)
  return 1.0 + np.sum(p * logs, axis=1) / np.log(base)


def disentanglement_completeness(importance: np.ndarray
                                 ) -> dict[str, object]:
  """DCI disentanglement and completeness of an importance matrix R [K, F].

  Disentanglement of dimension i is 1 - H_F(R[i] / sum R[i]) (entropy in base
  F); the score weighs dimensions by their share of the total importance.
  Completeness of factor k is 1 - H_K(R[:, k] / sum R[:, k]), weighed alike.
  """
  importance = np.asarray(importance, np.float64)
  if importance.ndim != 2 or np.any(importance < 0) or not np.all(
      np.isfinite(importance)):
    raise MetricError(
        f"importance must be a finite non-negative [K, F] matrix, got shape "
        f"{importance.shape}")
  total = importance.sum()
  if total <= 0:
    return {"disentanglement": 0.0, "completeness": 0.0,
            "disentanglement_per_dim": np.zeros(importance.shape[0]),
            "completeness_per_factor": np.zeros(importance.shape[1])}
  per_dim = _one_minus_entropy(importance, importance.shape[1])
  per_factor = _one_minus_entropy(importance.T, importance.shape[0])
  dim_weight = importance.sum(axis=1) / total
  factor_weight = importance.sum(axis=0) / total
  return {
      "disentanglement": float(np.sum(dim_weight * per_dim)),
      "completeness": float(np.sum(factor_weight * per_factor)),
      "disentanglement_per_dim": per_dim,
      "completeness_per_factor": per_factor,
  }


def dci_from_codes(codes_train: object, factors_train: object,
                   codes_test: object, factors_test: object, *,
                   importance_model: str = "random_forest",
                   num_trees: int = 10, lasso_alpha: float = 0.01,
                   seed: int = 0) -> dict[str, object]:
  """DCI of computed codes.

  One predictor per varying factor gives the importance matrix R [K, F'].
  `importance_model`:
    * "random_forest" (default, fast): a random forest classifier of
      `num_trees` trees, R from its impurity importances. Eastwood & Williams
      used random forests and the lasso.
    * "gradient_boosting": sklearn's GradientBoostingClassifier as
      disentanglement_lib runs DCI; much slower (one tree per class per
      round, so 40 trees a round for dSprites' orientation).
    * "lasso": a lasso regression of the standardised class index on
      standardised codes, R = |coefficients|; linear, so it rewards codes
      that are linear in the factors.

  Args:
    codes_train, factors_train: float [n, K] and int [n, F].
    codes_test, factors_test: float [m, K] and int [m, F], held out.
    importance_model: one of `IMPORTANCE_MODELS`.
    num_trees: trees of the random forest.
    lasso_alpha: L1 weight of the lasso.
    seed: random state of the predictors.

  Returns:
    {"score": disentanglement, "disentanglement", "completeness",
     "informativeness_train", "informativeness_test" (mean accuracy over
     factors; R^2 for the lasso), "importance" [K, F'],
     "disentanglement_per_dim" [K], "completeness_per_factor" [F'],
     "factors" (indices scored)}.
  """
  if importance_model not in IMPORTANCE_MODELS:
    raise MetricError(
        f"importance_model={importance_model!r} is unknown; choose one of "
        f"{', '.join(IMPORTANCE_MODELS)}")
  num_trees = _check_count("num_trees", num_trees)
  if not np.isfinite(lasso_alpha) or lasso_alpha <= 0:
    raise MetricError(f"lasso_alpha={lasso_alpha!r} must be > 0")
  num_train = np.shape(codes_train)[0] if np.ndim(codes_train) else 0
  num_test = np.shape(codes_test)[0] if np.ndim(codes_test) else 0
  if num_train < 2 or num_test < 1:
    raise MetricError(
        f"DCI needs >= 2 training and >= 1 test points, got {num_train} and "
        f"{num_test}")
  codes_train = _check_codes(codes_train, num_train, "codes_train")
  codes_test = _check_codes(codes_test, num_test, "codes_test")
  if codes_test.shape[1] != codes_train.shape[1]:
    raise MetricError(
        f"codes_test has {codes_test.shape[1]} dimensions, codes_train "
        f"{codes_train.shape[1]}; they must come from the same representation")
  factors_train = _check_factors(factors_train, num_train, "factors_train")
  factors_test = _check_factors(factors_test, num_test, "factors_test")
  if factors_test.shape[1] != factors_train.shape[1]:
    raise MetricError("factors_train and factors_test differ in width")
  scored = np.array([k for k in range(factors_train.shape[1])
                     if np.unique(factors_train[:, k]).size > 1], np.int64)
  if scored.size == 0:
    raise MetricError("every factor is constant in the training points; DCI "
                      "needs at least one factor that varies")

  importance = np.zeros((codes_train.shape[1], scored.size))
  train_fit, test_fit = [], []
  for column, k in enumerate(scored):
    importance[:, column], train, test = _importance_and_informativeness(
        codes_train, factors_train[:, k], codes_test, factors_test[:, k],
        importance_model, num_trees, lasso_alpha, seed + column)
    train_fit.append(train)
    test_fit.append(test)
  result = disentanglement_completeness(importance)
  result.update({
      "score": result["disentanglement"],
      "informativeness_train": float(np.mean(train_fit)),
      "informativeness_test": float(np.mean(test_fit)),
      "importance": importance,
      "factors": scored,
  })
  return result


def dci_score(represent: Represent, factor_sizes: Sequence[int],
              rng: np.random.Generator, *, num_train: int = 10_000,
              num_test: int = 5_000, importance_model: str = "random_forest",
              num_trees: int = 10, lasso_alpha: float = 0.01,
              encode_chunk: int = _DEFAULT_CHUNK) -> dict[str, object]:
  """DCI on random factor vectors: `num_train` to fit, `num_test` to score.

  Defaults (10,000 / 5,000 points) follow disentanglement_lib; the predictor
  is a fast random forest unless `importance_model` says otherwise (see
  `dci_from_codes`).

  Returns:
    As `dci_from_codes`, with "factors" as indices into `factor_sizes` and
    "chance": 0 (for disentanglement).
  """
  sizes = _check_sizes(factor_sizes)
  rng = _check_rng(rng)
  num_train = _check_count("num_train", num_train, 2)
  num_test = _check_count("num_test", num_test)
  encode_chunk = _check_count("encode_chunk", encode_chunk)
  factors = varying_factors(sizes)
  classes = _sample(rng, (num_train + num_test,), sizes)
  codes = _encode(represent, classes, encode_chunk)
  result = dci_from_codes(
      codes[:num_train], classes[:num_train, factors],
      codes[num_train:], classes[num_train:, factors],
      importance_model=importance_model, num_trees=num_trees,
      lasso_alpha=lasso_alpha, seed=_sklearn_seed(rng))
  result["factors"] = factors[result["factors"]]
  result["chance"] = 0.0
  return result
