"""Known-answer tests for avb/disentanglement.py.

Every metric is run on representations computed straight from the factor
classes, no images or training involved, whose answers are known:

* the factors themselves as the code: near perfect;
* independent noise: chance, which is 1 / 5 for the beta-VAE and FactorVAE
  classifiers (5 varying dSprites factors) and 0 for MIG and DCI;
* a permutation of the code dimensions, and a rescaling of each: the same
  score, both for the perfect code and for a mixed one (where the score is
  not pinned at 1);
* a rotation of the standardised factors: clearly lower than the factors.

Sizes are small and seeds fixed; tolerances are several standard deviations
of the seed-to-seed spread measured at these sizes.
"""

import numpy as np
import pytest

from avb import disentanglement as dis
from avb import dsprites

SIZES = tuple(int(s) for s in dsprites.LATENTS_SIZES)
_VARYING = np.array(SIZES[1:])
_MEAN = (_VARYING - 1) / 2
_STD = np.sqrt((_VARYING ** 2 - 1) / 12)  # of a uniform class index
PERMUTATION = np.array([3, 0, 4, 1, 2])
SCALES = np.array([0.5, 3.0, 0.25, 2.0, 1.5])


def factors_code(classes):
  return classes[:, 1:].astype(np.float64)


def noise_code(seed=123):
  noise = np.random.default_rng(seed)
  return lambda classes: noise.normal(size=(classes.shape[0], 5))


def _rotation(seed=0):
  q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(5, 5)))
  return q * np.sign(np.diag(r))


ROTATION = _rotation()


def rotated_code(classes):
  return ((classes[:, 1:] - _MEAN) / _STD) @ ROTATION.T


def permuted(represent):
  return lambda classes: represent(classes)[:, PERMUTATION]


def rescaled(represent):
  return lambda classes: represent(classes) * SCALES


# Small but stable settings for each metric; seed -> score.
METRICS = {
    "beta_vae": lambda r, seed: dis.beta_vae_score(
        r, SIZES, np.random.default_rng(seed), batch_size=16, num_train=400,
        num_eval=300),
    "factor_vae": lambda r, seed: dis.factor_vae_score(
        r, SIZES, np.random.default_rng(seed), batch_size=32, num_train=300,
        num_eval=300, num_variance_estimate=2000),
    "mig": lambda r, seed: dis.mig_score(
        r, SIZES, np.random.default_rng(seed), num_points=4000),
    "dci": lambda r, seed: dis.dci_score(
        r, SIZES, np.random.default_rng(seed), num_train=1500, num_test=500),
}
# (lowest score of the factors as the code, chance, tolerance around chance)
KNOWN = {
    "beta_vae": (0.95, 0.2, 0.08),
    "factor_vae": (0.95, 0.2, 0.08),
    # 20 bins cannot separate 40 orientations or 32 positions, which caps the
    # MIG of the factors themselves near 0.885 (see test_mig_more_bins).
    "mig": (0.85, 0.0, 0.02),
    "dci": (0.95, 0.0, 0.05),
}


@pytest.fixture(scope="module")
def reference_scores():
  return {name: {"factors": metric(factors_code, 0)["score"],
                 "rotated": metric(rotated_code, 0)["score"]}
          for name, metric in METRICS.items()}


@pytest.mark.parametrize("name", METRICS)
def test_factors_as_code_score_near_perfect(name, reference_scores):
  assert reference_scores[name]["factors"] > KNOWN[name][0]


@pytest.mark.parametrize("name", METRICS)
def test_noise_scores_chance(name):
  _, chance, tolerance = KNOWN[name]
  result = METRICS[name](noise_code(), 1)
  assert result["chance"] == chance
  assert abs(result["score"] - chance) < tolerance, result["score"]


@pytest.mark.parametrize("name", METRICS)
@pytest.mark.parametrize("transform", [permuted, rescaled])
@pytest.mark.parametrize("code", ["factors", "rotated"])
def test_permutation_and_rescaling_leave_the_score(name, transform, code,
                                                   reference_scores):
  represent = {"factors": factors_code, "rotated": rotated_code}[code]
  score = METRICS[name](transform(represent), 0)["score"]
  # The same seed draws the same factors, so the only differences come from
  # solver tie-breaking (logistic regression, random forest feature order).
  assert score == pytest.approx(reference_scores[name][code], abs=0.02)


@pytest.mark.parametrize("name", METRICS)
def test_mixing_lowers_the_score(name, reference_scores):
  scores = reference_scores[name]
  assert scores["rotated"] < scores["factors"] - 0.2, scores


def test_beta_vae_diagnostics():
  result = METRICS["beta_vae"](factors_code, 2)
  assert result["train_accuracy"] == result["eval_accuracy"] == 1.0
  assert result["num_factors"] == 5


def test_factor_vae_votes_and_pruning():
  result = METRICS["factor_vae"](factors_code, 3)
  # Each dimension is voted for only by its own factor.
  votes = result["votes"]
  assert votes.shape == (5, 5)
  np.testing.assert_array_equal(votes, np.diag(np.diag(votes)))
  # A collapsed (constant) dimension is dropped; the score is unchanged.
  with_dead = lambda c: np.concatenate(
      [factors_code(c), np.full((len(c), 1), 0.3)], axis=1)
  result = METRICS["factor_vae"](with_dead, 3)
  assert result["num_active_dims"] == 5 and result["score"] == 1.0
  dead = dis.factor_vae_score(lambda c: np.zeros((len(c), 2)), SIZES,
                              np.random.default_rng(0), num_train=10,
                              num_eval=10, num_variance_estimate=10)
  assert dead["score"] == 0.0 and dead["num_active_dims"] == 0


def test_mig_more_bins():
  # With a bin per class, the factors as the code are near 1 (the gap is
  # only reduced by the plug-in bias of the runner-up's mutual information).
  result = dis.mig_score(factors_code, SIZES, np.random.default_rng(0),
                         num_points=4000, num_bins=64)
  assert result["score"] > 0.9
  np.testing.assert_array_equal(result["factors"], [1, 2, 3, 4, 5])
  info = result["mutual_information"]
  np.testing.assert_array_equal(np.argmax(info, axis=0), np.arange(5))
  np.testing.assert_allclose(np.diag(info), result["factor_entropy"])


def test_mig_from_codes_closed_form():
  # Two binary factors; code 0 copies factor 0, code 1 is factor 0 XOR
  # factor 1, independent of each factor alone: MIG = (1 + 0) / 2.
  rng = np.random.default_rng(0)
  factors = rng.integers(0, 2, size=(20_000, 2))
  codes = np.stack([factors[:, 0], factors[:, 0] ^ factors[:, 1]], axis=1)
  result = dis.mig_from_codes(codes.astype(float), factors, num_bins=2)
  np.testing.assert_allclose(result["mig_per_factor"], [1.0, 0.0],
                             atol=1e-3)
  assert result["score"] == pytest.approx(0.5, abs=1e-3)


def test_disentanglement_completeness_closed_form():
  perfect = dis.disentanglement_completeness(np.eye(3))
  assert perfect["disentanglement"] == perfect["completeness"] == 1.0
  uniform = dis.disentanglement_completeness(np.ones((3, 3)))
  assert uniform["disentanglement"] == pytest.approx(0.0, abs=1e-12)
  assert uniform["completeness"] == pytest.approx(0.0, abs=1e-12)
  # One dimension explains both factors equally, the other only factor 0:
  # D = (2/3) (1 - 1) + (1/3) (1 - 0) = 1/3; completeness of factor 0 is
  # 1 - H_2(1/2, 1/2) = 0 and of factor 1 is 1, weighed 2/3 and 1/3.
  result = dis.disentanglement_completeness(np.array([[1.0, 1.0],
                                                      [1.0, 0.0]]))
  assert result["disentanglement"] == pytest.approx(1 / 3)
  assert result["completeness"] == pytest.approx(1 / 3)


def test_dci_diagnostics_and_lasso():
  result = METRICS["dci"](factors_code, 4)
  assert result["informativeness_test"] > 0.99
  assert result["completeness"] > 0.95
  importance = result["importance"]
  np.testing.assert_array_equal(np.argmax(importance, axis=0), np.arange(5))
  lasso = dis.dci_score(factors_code, SIZES, np.random.default_rng(4),
                        num_train=1000, num_test=300, importance_model="lasso")
  assert lasso["disentanglement"] > 0.95
  assert lasso["informativeness_test"] > 0.99  # R^2 of a linear target
  rotated = dis.dci_score(rotated_code, SIZES, np.random.default_rng(4),
                          num_train=1000, num_test=300,
                          importance_model="lasso")
  assert rotated["disentanglement"] < 0.6


def test_image_representation_batches():
  calls = []

  def encode(images):
    calls.append(images.shape[0])
    assert images.dtype == np.float32
    return images.reshape(len(images), -1)[:, :3]

  represent = dis.image_representation(
      encode, lambda c: np.repeat(c[:, :1, None], 4, axis=2).astype(np.uint8),
      batch_size=4)
  codes = represent(np.arange(10)[:, None] * np.ones((1, 6), np.int64))
  assert calls == [4, 4, 2]
  np.testing.assert_array_equal(codes[:, 0], np.arange(10))


# ----------------------------------------------------------------------------
# Bad inputs.


def _one_line(excinfo, *needles):
  assert excinfo.type is dis.MetricError
  message = str(excinfo.value)
  assert "\n" not in message
  for needle in needles:
    assert needle in message, message


@pytest.mark.parametrize("name", METRICS)
def test_nan_codes_are_refused(name):
  def with_nan(classes):
    codes = factors_code(classes)
    codes[0, 0] = np.nan
    return codes

  with pytest.raises(dis.MetricError) as excinfo:
    METRICS[name](with_nan, 0)
  _one_line(excinfo, "NaN")


@pytest.mark.parametrize("name", METRICS)
def test_wrong_code_shape_is_refused(name):
  with pytest.raises(dis.MetricError) as excinfo:
    METRICS[name](lambda c: factors_code(c)[:, 0], 0)
  _one_line(excinfo, "shape", "expected [")
  with pytest.raises(dis.MetricError) as excinfo:
    METRICS[name](lambda c: factors_code(c)[1:], 0)
  _one_line(excinfo, "shape")


def test_bad_arguments_are_refused():
  rng = np.random.default_rng(0)
  with pytest.raises(dis.MetricError) as excinfo:
    dis.beta_vae_score(factors_code, SIZES, rng, num_eval=0)
  _one_line(excinfo, "num_eval=0", ">= 1")
  with pytest.raises(dis.MetricError) as excinfo:
    dis.factor_vae_score(factors_code, SIZES, rng, num_train=-3)
  _one_line(excinfo, "num_train=-3")
  with pytest.raises(dis.MetricError) as excinfo:
    dis.mig_score(factors_code, SIZES, rng, num_points=1)
  _one_line(excinfo, "num_points=1")
  with pytest.raises(dis.MetricError) as excinfo:
    dis.dci_score(factors_code, SIZES, rng, num_train=2.5)
  _one_line(excinfo, "num_train=2.5")
  with pytest.raises(dis.MetricError) as excinfo:
    dis.mig_score(factors_code, SIZES, 0)
  _one_line(excinfo, "Generator")
  with pytest.raises(dis.MetricError) as excinfo:
    dis.mig_score(factors_code, (1, 1), rng)
  _one_line(excinfo, "nothing to disentangle")
  with pytest.raises(dis.MetricError) as excinfo:
    dis.mig_score("encoder", SIZES, rng, num_points=10)
  _one_line(excinfo, "callable")
  with pytest.raises(dis.MetricError) as excinfo:
    dis.dci_score(factors_code, SIZES, rng, num_train=10, num_test=5,
                  importance_model="xgboost")
  _one_line(excinfo, "xgboost", "random_forest")
  with pytest.raises(dis.MetricError) as excinfo:
    dis.mig_from_codes(np.zeros((1, 2)), np.zeros((1, 2), np.int64))
  _one_line(excinfo, "at least 2 points")
  with pytest.raises(dis.MetricError) as excinfo:
    dis.mig_from_codes(np.zeros((5, 2)), np.zeros((4, 2), np.int64))
  _one_line(excinfo, "factors", "[5, F]")
