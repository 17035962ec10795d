"""A conditional VAE that completes partly observed digits (Doersch 2016, section 4).

The task. Each MNIST image is cut by a fixed rectangular *condition region*
(`config.condition`): the pixels inside it are observed, c; the rest, x, are
to be predicted. Given c there are often several plausible x (the top half of
a digit can end as a 7 or a 9), which is what a conditional VAE can
represent and a regressor cannot.

The models, both with Bernoulli outputs over the pixels of x:

  * the conditional VAE: prior p(z) = N(0, I) (independent of c), decoder
    p(x|z, c), encoder q(z|x, c), trained on the conditional ELBO
    E_q[log p(x|z, c)] - KL(q(z|x, c) || N(0, I)) with SGVB estimator B;
  * the deterministic regressor baseline of the tutorial: an MLP from c to
    Bernoulli means of x, trained on log p(x|c) (the same likelihood), which
    can only predict one, averaged, completion.

Modelling x rather than the whole image is the same as modelling the whole
image y = (c, x) with the decoder copying the observed pixels: p(y|c) =
p(x|c), so nothing is lost, and no capacity or log-likelihood is spent on
pixels that are given.

Evaluation on held-out images: the conditional log-likelihood log p(x|c) of
both models, in nats per image (the regressor's is exact; the CVAE's is the
importance-sampled estimate with q(z|x, c) as the proposal and K samples, a
stochastic lower bound that tightens with K), so the two are the same
quantity and comparable; also the CVAE's ELBO, and a figure of inputs, the
truth, the regressor's output and several CVAE samples z ~ N(0, I) per input.

As in the rest of avb, MNIST intensities in [0, 1] are used directly as the
Bernoulli targets, so "log-likelihoods" are negative cross-entropies (see
WORKSPACE.md).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import time
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from avb import random_streams
from avb import config_utils
from avb import distributions
from avb import estimators
from avb import input_pipeline
from avb import train

PyTree = Any

# Named condition regions: (rows, cols) as half-open [start, stop) ranges of
# an H x W image. "box" takes them from config.condition.rows / .cols.
REGIONS = ("top_half", "bottom_half", "left_half", "right_half",
           "centre_columns", "centre_patch", "box")
ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "elu": jax.nn.elu,
               "softplus": jax.nn.softplus}
MNIST_LIKE = ("mnist", "binarized_mnist", "fashion_mnist")
IMAGE_SHAPE = (28, 28)


# ----------------------------------------------------------------------------
# The condition region.


def region_box(condition: ml_collections.ConfigDict,
               image_shape: tuple[int, int]) -> tuple[tuple[int, int],
                                                      tuple[int, int]]:
  """The observed rectangle ((row_start, row_stop), (col_start, col_stop)).

  Args:
    condition: `config.condition`: `region`, one of `REGIONS`, and for "box"
      `rows` and `cols`, each (start, stop), half-open.
    image_shape: (H, W).

  Raises:
    config_utils.ConfigError: an unknown region, a box outside the image,
      or a region that covers nothing or the whole image.
  """
  height, width = image_shape
  name = condition.region
  presets = {
      "top_half": ((0, height // 2), (0, width)),
      "bottom_half": ((height // 2, height), (0, width)),
      "left_half": ((0, height), (0, width // 2)),
      "right_half": ((0, height), (width // 2, width)),
      # A central strip of columns, as in Doersch's MNIST example.
      "centre_columns": ((0, height), (width // 2 - 2, width // 2 + 2)),
      "centre_patch": ((height // 4, height - height // 4),
                       (width // 4, width - width // 4)),
  }
  if name not in REGIONS:
    raise config_utils.ConfigError(
        f"config.condition.region={name!r} is invalid: allowed: "
        f"{', '.join(REGIONS)}")
  if name != "box":
    return presets[name]
  box = []
  for field, size in (("rows", height), ("cols", width)):
    value = tuple(condition[field])
    if (len(value) != 2 or not all(isinstance(v, int) for v in value)
        or not 0 <= value[0] <= value[1] <= size):
      raise config_utils.ConfigError(
          f"config.condition.{field}={value!r} is invalid: give (start, stop) "
          f"with 0 <= start <= stop <= {size}, e.g. (0, {size // 2})")
    box.append(value)
  (r0, r1), (c0, c1) = box
  if r0 == r1 or c0 == c1:
    raise config_utils.ConfigError(
        f"config.condition region rows={box[0]} cols={box[1]} covers nothing "
        "(no observed pixel to condition on); give start < stop, e.g. "
        f"--config.condition.rows=(0,{height // 2})")
  if (r0, r1, c0, c1) == (0, height, 0, width):
    raise config_utils.ConfigError(
        f"config.condition region rows={box[0]} cols={box[1]} covers the "
        f"whole {height}x{width} image (nothing left to predict); make it "
        f"smaller, e.g. --config.condition.rows=(0,{height // 2})")
  return box[0], box[1]


# ----------------------------------------------------------------------------
# The models.


@dataclasses.dataclass(frozen=True)
class CVAEConfig:
  """Everything that fixes the shapes of the CVAE and the regressor.

  Attributes:
    image_shape: (H, W).
    rows, cols: the observed rectangle, half-open (start, stop) ranges.
    num_latents: J.
    hidden_sizes: widths of the hidden layers of the CVAE's encoder and
      decoder (each).
    regressor_hidden_sizes: widths of the regressor's hidden layers.
    activation: hidden nonlinearity, a key of `ACTIVATIONS`.
  """
  image_shape: tuple[int, int]
  rows: tuple[int, int]
  cols: tuple[int, int]
  num_latents: int
  hidden_sizes: tuple[int, ...] = (500,)
  regressor_hidden_sizes: tuple[int, ...] = (500,)
  activation: str = "relu"

  @property
  def observed_mask(self) -> np.ndarray:
    """[H, W] booleans, True inside the condition region."""
    mask = np.zeros(self.image_shape, bool)
    mask[self.rows[0]:self.rows[1], self.cols[0]:self.cols[1]] = True
    return mask

  @property
  def observed_indices(self) -> np.ndarray:
    """Flat pixel indices of c, [V]."""
    return np.flatnonzero(self.observed_mask.reshape(-1))

  @property
  def hidden_indices(self) -> np.ndarray:
    """Flat pixel indices of x (everything outside the region), [D - V]."""
    return np.flatnonzero(~self.observed_mask.reshape(-1))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  image_shape: tuple[int, int]) -> "CVAEConfig":
    rows, cols = region_box(config.condition, image_shape)
    return cls(image_shape=tuple(int(s) for s in image_shape),
               rows=tuple(rows), cols=tuple(cols),
               num_latents=int(config.model.num_latents),
               hidden_sizes=tuple(int(h) for h in config.model.hidden_sizes),
               regressor_hidden_sizes=tuple(
                   int(h) for h in config.regressor.hidden_sizes),
               activation=str(config.model.activation))


class _MLP(nn.Module):
  """Hidden layers, then a linear layer of `out` units."""
  sizes: tuple[int, ...]
  out: int
  activation: str

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    for i, size in enumerate(self.sizes):
      h = ACTIVATIONS[self.activation](nn.Dense(size, name=f"hidden_{i}")(h))
    return nn.Dense(self.out, name="out")(h)


def _broadcast_to_leading(c: jax.Array, z: jax.Array) -> jax.Array:
  """c [B, V] broadcast to z's leading axes, e.g. [L, B, V] for z [L, B, J]."""
  return jnp.broadcast_to(c, (*z.shape[:-1], c.shape[-1]))


class ConditionalVAE(nn.Module):
  """q(z|x, c) and p(x|z, c) with p(z) = N(0, I); x, c flattened."""
  config: CVAEConfig

  def setup(self):
    config = self.config
    self.encoder = _MLP(config.hidden_sizes, 2 * config.num_latents,
                        config.activation)
    self.decoder = _MLP(tuple(reversed(config.hidden_sizes)),
                        len(config.hidden_indices), config.activation)

  def encode(self, x: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B, D-V], c [B, V] -> (mean, log_var) of q(z|x, c), each [B, J]."""
    out = self.encoder(jnp.concatenate([x, c], axis=-1))
    return jnp.split(out, 2, axis=-1)

  def decode(self, z: jax.Array, c: jax.Array) -> jax.Array:
    """z [..., B, J], c [B, V] -> Bernoulli logits of x, [..., B, D-V]."""
    return self.decoder(jnp.concatenate([z, _broadcast_to_leading(c, z)], -1))

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    mean, _ = self.encode(x, c)
    return self.decode(mean, c)


class Regressor(nn.Module):
  """The deterministic baseline: c [B, V] -> Bernoulli logits of x [B, D-V]."""
  config: CVAEConfig

  @nn.compact
  def __call__(self, c: jax.Array) -> jax.Array:
    config = self.config
    return _MLP(config.regressor_hidden_sizes, len(config.hidden_indices),
                config.activation, name="mlp")(c)


def init_params(config: CVAEConfig, rng: jax.Array) -> PyTree:
  """{"cvae": ..., "regressor": ...} parameters (Flax's default initialisers)."""
  cvae_key, regressor_key = jax.random.split(rng)
  x = jnp.zeros((1, len(config.hidden_indices)), jnp.float32)
  c = jnp.zeros((1, len(config.observed_indices)), jnp.float32)
  return {"cvae": ConditionalVAE(config).init(cvae_key, x, c)["params"],
          "regressor": Regressor(config).init(regressor_key, c)["params"]}


def split_image(config: CVAEConfig, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Flattened images [B, D] -> (x: the pixels to predict [B, D-V], c [B, V])."""
  return (jnp.take(images, config.hidden_indices, axis=-1),
          jnp.take(images, config.observed_indices, axis=-1))


def join_image(config: CVAEConfig, x: jax.Array, c: jax.Array) -> jax.Array:
  """The inverse of `split_image`: x [..., D-V], c [..., V] -> [..., D]."""
  leading = jnp.broadcast_shapes(x.shape[:-1], c.shape[:-1])
  image = jnp.zeros((*leading, math.prod(config.image_shape)), x.dtype)
  image = image.at[..., config.hidden_indices].set(
      jnp.broadcast_to(x, (*leading, x.shape[-1])))
  return image.at[..., config.observed_indices].set(
      jnp.broadcast_to(c, (*leading, c.shape[-1])).astype(x.dtype))


def _cvae_parts(config: CVAEConfig, cvae_params: PyTree, x: jax.Array,
                c: jax.Array) -> tuple[jax.Array, jax.Array, Callable]:
  """(mean, log_var) of q(z|x, c) and z [L, B, J] -> log p(x|z, c) [L, B]."""
  model = ConditionalVAE(config)
  variables = {"params": cvae_params}
  mean, log_var = model.apply(variables, x, c, method=ConditionalVAE.encode)

  def log_likelihood_fn(z):
    logits = model.apply(variables, z, c, method=ConditionalVAE.decode)
    return jnp.sum(distributions.bernoulli_log_prob(x, logits), axis=-1)

  return mean, log_var, log_likelihood_fn


def cvae_elbo_terms(config: CVAEConfig, cvae_params: PyTree, x: jax.Array,
                    c: jax.Array, rng: jax.Array,
                    num_samples: int = 1) -> dict[str, jax.Array]:
  """The conditional ELBO of x [B, D-V] given c [B, V] by SGVB estimator B.

  Returns:
    `estimators.sgvb_b`'s per-example terms: "elbo", "reconstruction",
    "kl" [B], "kl_per_latent" [B, J], "z" [L, B, J].
  """
  mean, log_var, log_likelihood_fn = _cvae_parts(config, cvae_params, x, c)
  return estimators.sgvb_b(rng, mean, log_var, log_likelihood_fn, num_samples)


def cvae_log_likelihood(config: CVAEConfig, cvae_params: PyTree, x: jax.Array,
                        c: jax.Array, rng: jax.Array, num_samples: int,
                        chunk_size: int = 250) -> jax.Array:
  """Importance-sampled log p(x|c) [B], q(z|x, c) the proposal, K = num_samples."""
  mean, log_var, log_likelihood_fn = _cvae_parts(config, cvae_params, x, c)
  return estimators.importance_log_likelihood(
      rng, mean, log_var, log_likelihood_fn, num_samples,
      min(chunk_size, num_samples))


def regressor_logits(config: CVAEConfig, regressor_params: PyTree,
                     c: jax.Array) -> jax.Array:
  return Regressor(config).apply({"params": regressor_params}, c)


def regressor_log_likelihood(config: CVAEConfig, regressor_params: PyTree,
                             x: jax.Array, c: jax.Array) -> jax.Array:
  """log p(x|c) [B] of the regressor: its Bernoulli log-likelihood of x."""
  logits = regressor_logits(config, regressor_params, c)
  return jnp.sum(distributions.bernoulli_log_prob(x, logits), axis=-1)


def sample_completions(config: CVAEConfig, cvae_params: PyTree, c: jax.Array,
                       rng: jax.Array, num_samples: int) -> jax.Array:
  """Bernoulli means of x under p(x|z, c) for z ~ N(0, I): [S, B, D-V]."""
  z = jax.random.normal(rng, (num_samples, c.shape[0], config.num_latents))
  logits = ConditionalVAE(config).apply({"params": cvae_params}, z, c,
                                        method=ConditionalVAE.decode)
  return jax.nn.sigmoid(logits)


def loss_fn(params: PyTree, images: jax.Array, rng: jax.Array,
            hyper: dict[str, jax.Array], *, config: CVAEConfig,
            num_samples: int = 1) -> tuple[jax.Array, dict[str, jax.Array]]:
  """-(CVAE ELBO + regressor log-likelihood), minibatch means, and metrics.

  The two models share no parameters, so the sum trains each on its own
  objective (Adam's updates are per parameter). Fits `train.make_train_step`.
  """
  del hyper
  x, c = split_image(config, images)
  terms = cvae_elbo_terms(config, params["cvae"], x, c, rng, num_samples)
  regressor_ll = regressor_log_likelihood(config, params["regressor"], x, c)
  elbo = jnp.mean(terms["elbo"])
  regressor_mean = jnp.mean(regressor_ll)
  return -(elbo + regressor_mean), {
      "loss": -(elbo + regressor_mean),
      "cvae_elbo": elbo,
      "cvae_reconstruction": jnp.mean(terms["reconstruction"]),
      "cvae_kl": jnp.mean(terms["kl"]),
      "regressor_log_likelihood": regressor_mean,
  }


def make_eval_fn(config: CVAEConfig, mesh: jax.sharding.Mesh,
                 log_likelihood_samples: int, chunk_size: int) -> Callable:
  """Jitted masked sums over a batch for `train.evaluate`.

  Per example: the CVAE's importance-sampled log p(x|c) (when K > 0), its
  ELBO, the regressor's log p(x|c), and the paired difference; sums of
  values and of squares, so means and standard errors follow.
  """
  replicated, sharded = train.shardings(mesh)

  def sums(params, images, mask, rng, index):
    rng = jax.random.fold_in(rng, index)
    elbo_key, ll_key = jax.random.split(rng)
    x, c = split_image(config, images)
    elbo = cvae_elbo_terms(config, params["cvae"], x, c, elbo_key)["elbo"]
    regressor = regressor_log_likelihood(config, params["regressor"], x, c)
    values = {"cvae_elbo": elbo, "regressor_log_likelihood": regressor}
    if log_likelihood_samples > 0:
      cvae = cvae_log_likelihood(config, params["cvae"], x, c, ll_key,
                                 log_likelihood_samples, chunk_size)
      values["cvae_log_likelihood"] = cvae
      values["cvae_minus_regressor"] = cvae - regressor
    out = {"count": jnp.sum(mask)}
    for name, value in values.items():
      out[name] = jnp.sum(value * mask)
      out[f"{name}_sq"] = jnp.sum(jnp.square(value) * mask)
    return out

  return jax.jit(sums, in_shardings=(replicated, sharded, sharded, replicated,
                                     replicated), out_shardings=replicated)


def summarize_sums(sums: dict[str, np.ndarray]) -> dict[str, float]:
  """Means and standard errors over examples of `make_eval_fn`'s sums."""
  count = float(sums["count"])
  out = {"count": int(count)}
  for name in sums:
    if name == "count" or name.endswith("_sq"):
      continue
    mean = float(sums[name]) / count
    variance = max(float(sums[f"{name}_sq"]) / count - mean**2, 0.0)
    out[name] = mean
    out[f"{name}_stderr"] = math.sqrt(variance / count)
  return out


def completion_statistics(config: CVAEConfig, params: PyTree,
                          images: np.ndarray, rng: jax.Array,
                          num_samples: int) -> dict[str, float]:
  """How different the CVAE's completions are from the regressor's average.

  On images [N, D], with S = num_samples completions per input:
    sample_spread: the per-pixel standard deviation over the S CVAE
      completions (Bernoulli means), averaged over the pixels of x: 0 for a
      model that always completes the same way;
    cvae_pixel_entropy, regressor_pixel_entropy: the mean binary entropy (in
      nats) of the predicted pixel means: a blurred, averaged completion has
      more grey pixels, hence higher entropy;
    cvae_best_of_samples_mse, regressor_mse: the squared error to the truth
      per pixel, for the best of the S completions of each input and for the
      regressor's (the regressor minimises the expected squared error of one
      guess, so it wins against a single sample; several samples that
      cover the plausible completions can come closer).
  """
  values = jax.device_get(_completion_statistics(
      config, params, jnp.asarray(images), rng, num_samples))
  return {**{k: float(v) for k, v in values.items()},
          "num_images": int(images.shape[0]), "num_samples": num_samples}


@functools.partial(jax.jit, static_argnums=(0, 4))
def _completion_statistics(config: CVAEConfig, params: PyTree,
                           images: jax.Array, rng: jax.Array,
                           num_samples: int) -> dict[str, jax.Array]:
  x, c = split_image(config, images)
  samples = sample_completions(config, params["cvae"], c, rng, num_samples)
  regressor = jax.nn.sigmoid(regressor_logits(config, params["regressor"], c))

  def entropy(p):
    p = jnp.clip(p, 1e-6, 1 - 1e-6)
    return jnp.mean(-(p * jnp.log(p) + (1 - p) * jnp.log1p(-p)))

  sample_mse = jnp.mean(jnp.square(samples - x[None]), axis=-1)  # [S, N]
  return {
      "sample_spread": jnp.mean(jnp.std(samples, axis=0)),
      "cvae_pixel_entropy": entropy(samples),
      "regressor_pixel_entropy": entropy(regressor),
      "cvae_single_sample_mse": jnp.mean(sample_mse),
      "cvae_best_of_samples_mse": jnp.mean(jnp.min(sample_mse, axis=0)),
      "regressor_mse": jnp.mean(jnp.square(regressor - x)),
  }


# ----------------------------------------------------------------------------
# The figure.


def plot_completions(path: pathlib.Path, config: CVAEConfig, images: np.ndarray,
                     regressor_means: np.ndarray, samples: np.ndarray,
                     title: str = "") -> None:
  """Rows: inputs. Columns: condition c, truth, regressor, CVAE samples.

  Args:
    path: the PNG to write.
    config: the model (for the region).
    images: the true images, [N, D] in [0, 1].
    regressor_means: the regressor's Bernoulli means of x, [N, D-V].
    samples: CVAE completions (Bernoulli means of x), [S, N, D-V].
    title: a line above the figure.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.patches  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  height, width = config.image_shape
  num_inputs, num_samples = images.shape[0], samples.shape[0]
  mask = config.observed_mask
  x, c = split_image(config, jnp.asarray(images))

  def rgb(image):
    return np.repeat(np.asarray(image).reshape(height, width, 1), 3, axis=-1)

  def condition_image(i):
    image = rgb(images[i])
    image[~mask] = (0.18, 0.22, 0.45)  # unobserved: dark blue
    return image

  columns = ["condition c", "truth", "regressor"] + [
      f"CVAE sample {s + 1}" for s in range(num_samples)]
  fig, axes = plt.subplots(num_inputs, len(columns),
                           figsize=(1.15 * len(columns), 1.2 * num_inputs + 0.6),
                           squeeze=False)
  for i in range(num_inputs):
    cells = [condition_image(i), rgb(images[i]),
             rgb(join_image(config, jnp.asarray(regressor_means[i]), c[i]))]
    cells += [rgb(join_image(config, jnp.asarray(samples[s, i]), c[i]))
              for s in range(num_samples)]
    for j, (ax, cell) in enumerate(zip(axes[i], cells)):
      ax.imshow(np.clip(cell, 0, 1), interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if j > 0:  # outline the observed region on every completion
        ax.add_patch(matplotlib.patches.Rectangle(
            (config.cols[0] - 0.5, config.rows[0] - 0.5),
            config.cols[1] - config.cols[0], config.rows[1] - config.rows[0],
            fill=False, edgecolor="tab:orange", linewidth=0.8))
      if i == 0:
        ax.set_title(columns[j], fontsize=7)
  if title:
    fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def figure_inputs(images: np.ndarray, labels: np.ndarray | None,
                  num_images: int) -> np.ndarray:
  """Indices of the figure's inputs: the first test image of each class, then more."""
  if labels is None:
    return np.arange(min(num_images, len(images)))
  chosen = []
  for label in np.unique(labels):
    chosen.append(int(np.flatnonzero(labels == label)[0]))
  rest = [i for i in range(len(images)) if i not in set(chosen)]
  return np.asarray((chosen + rest)[:num_images])


# ----------------------------------------------------------------------------
# The run.


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks what the CVAE adds to `config_utils.validate_config`'s checks."""
  if config.data.name not in MNIST_LIKE:
    raise config_utils.ConfigError(
        f"config.data.name={config.data.name!r} is invalid for the CVAE: it "
        f"completes {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]} digits; use one of "
        f"{', '.join(MNIST_LIKE)}")
  if config.model.likelihood != "bernoulli":
    raise config_utils.ConfigError(
        f"config.model.likelihood={config.model.likelihood!r} is invalid for "
        "the CVAE: its decoder and regressor are Bernoulli; use bernoulli")
  if config.model.activation not in ACTIVATIONS:
    raise config_utils.ConfigError(
        f"config.model.activation={config.model.activation!r} is invalid: "
        f"allowed: {', '.join(ACTIVATIONS)}")
  sizes = tuple(config.regressor.hidden_sizes)
  if not sizes or not all(isinstance(s, int) and s >= 1 for s in sizes):
    raise config_utils.ConfigError(
        f"config.regressor.hidden_sizes={sizes!r} is invalid: give positive "
        "widths, e.g. (500,)")
  if config.eval.num_completions < 1:
    raise config_utils.ConfigError(
        f"config.eval.num_completions={config.eval.num_completions!r} is "
        "invalid: must be >= 1 CVAE sample per input")
  region_box(config.condition, IMAGE_SHAPE)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the CVAE and the regressor together, evaluates both, draws the figure.

  A run started on a workdir that holds a checkpoint resumes from it; Ctrl-C
  or SIGTERM saves a checkpoint first.

  Args:
    config: see experiments/configs/cvae.py.
    workdir: receives checkpoints/, metrics.jsonl, TensorBoard events,
      cvae_completions.png and summary.json (process 0 writes).

  Returns:
    The summary written to `workdir/summary.json`.
  """
  from avb import data as data_lib  # pylint: disable=g-import-not-at-top
  from avb import writers  # pylint: disable=g-import-not-at-top

  wall_start = time.time()
  validate(config)
  mesh = train.make_mesh()
  workdir_path = config_utils.check_workdir(workdir)
  dataset = data_lib.load_dataset(
      config.data.name, source=config.data.source,
      data_dir=config.data.data_dir, tfds_data_dir=config.data.tfds_data_dir,
      seed=config.seed, train_size=config.data.train_size,
      test_size=config.data.test_size)
  logging.info("Data:\n%s", dataset.describe())
  model_config = CVAEConfig.from_config(config, dataset.image_shape)
  logging.info("Condition region: rows %s, cols %s (%d observed, %d predicted "
               "pixels).", model_config.rows, model_config.cols,
               len(model_config.observed_indices),
               len(model_config.hidden_indices))

  num_shards = mesh.size
  batch_size = config.training.batch_size
  per_shard = input_pipeline.shard_size(dataset.train.images.shape[0],
                                        num_shards, batch_size)
  num_train = per_shard * num_shards
  train_images = dataset.train.images[input_pipeline.process_rows(
      dataset.train.images.shape[0], num_shards)]
  test_images = dataset.test.images

  tx = train.make_optimizer(config.optimizer)
  replicated, sharded = train.shardings(mesh)
  params = init_params(model_config, random_streams.key(
      config.seed, random_streams.Stream.INIT))
  state = train.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      bad_step=jnp.full((), -1, jnp.int32),
      seed=jnp.asarray(config.seed, jnp.int32), hyper={})
  state = jax.device_put(state, replicated)
  manager = train.checkpoint_manager(workdir_path,
                                     config.training.max_checkpoints_to_keep)
  latest = manager.latest_step()
  if latest is not None:
    state = train.resume(manager, latest, state, workdir)
  else:
    writers.write_json(workdir_path / "config.json", config.to_dict())
  initial_step = latest if latest is not None else 0

  train_step = train.make_train_step(
      lambda p, x, rng, hyper: loss_fn(p, x, rng, hyper, config=model_config,
                                       num_samples=config.objective.num_samples),
      tx, dynamic_binarization=config.data.dynamic_binarization)
  loop = train.TrainLoop(
      state, initial_step,
      device_steps=train.make_device_steps(train_step, mesh,
                                           batch_size=batch_size,
                                           per_shard=per_shard),
      data=input_pipeline.device_dataset(train_images, num_shards, sharded),
      steps_per_call=config.training.steps_per_call)
  elbo_only = make_eval_fn(model_config, mesh, 0, 1)
  eval_key = random_streams.key(config.seed, random_streams.Stream.EVAL)
  after = lambda stream: random_streams.sub_key(eval_key, stream)
  eval_streams = random_streams.EvalStream
  logger = writers.MetricLogger(workdir_path,
                               num_steps=config.training.num_steps)

  def check_finite() -> None:
    if int(np.asarray(loop.state.bad_step)) >= 0:
      raise train.NonFiniteError(
          f"non-finite loss or gradient at step {int(loop.state.bad_step)}; "
          f"stopped. The last good checkpoint ({manager.latest_step()}) in "
          f"{manager.directory} is intact. Try a smaller "
          "--config.optimizer.learning_rate.")

  num_steps = config.training.num_steps
  boundaries = (config.training.log_every, config.training.eval_every,
                config.training.checkpoint_every)
  interval_start, interval_step = time.time(), initial_step
  try:
    while loop.step < num_steps:
      loop.run(min([num_steps] + [(loop.step // k + 1) * k for k in boundaries]))
      done = loop.step
      if done % config.training.log_every == 0 or done == num_steps:
        check_finite()
        rate = (done - interval_step) / max(time.time() - interval_start, 1e-9)
        logger.write(done, {**loop.pop_metrics(), "steps_per_sec": rate,
                            "eta_seconds": (num_steps - done) / max(rate, 1e-9)},
                     "train")
        interval_start, interval_step = time.time(), done
      if done % config.training.eval_every == 0 and done != num_steps:
        logger.write(done, summarize_sums(train.evaluate(
            elbo_only, loop.state.params, test_images, config.eval.batch_size,
            eval_key, sharded)), "test")
      if done % config.training.checkpoint_every == 0 and done != num_steps:
        check_finite()
        train.save_checkpoint(manager, loop.state)
  except KeyboardInterrupt:
    try:
      if loop.step > initial_step and int(loop.state.bad_step) < 0:
        train.save_checkpoint(manager, loop.state)
        manager.wait_until_finished()
        logging.warning("Interrupted: saved a checkpoint at step %d.", loop.step)
    except RuntimeError as e:  # interrupted mid-dispatch: buffers donated
      logging.warning("Interrupted; no new checkpoint (%s).", e)
    raise
  check_finite()
  if latest is None or loop.step != latest:
    train.save_checkpoint(manager, loop.state)
  manager.wait_until_finished()
  manager.close()
  params = jax.device_get(loop.state.params)

  # Held-out evaluation: the ELBO on the whole test split, the conditional
  # log-likelihoods on the first `log_likelihood_examples`.
  test = summarize_sums(train.evaluate(elbo_only, params, test_images,
                                       config.eval.batch_size, eval_key, sharded))
  ll_images = test_images[:config.eval.log_likelihood_examples or len(test_images)]
  ll_start = time.time()
  ll_fn = make_eval_fn(model_config, mesh, config.eval.log_likelihood_samples,
                       config.eval.log_likelihood_chunk)
  ll = summarize_sums(train.evaluate(ll_fn, params, ll_images,
                                     config.eval.batch_size,
                                     after(eval_streams.TEST_LOG_LIKELIHOOD),
                                     sharded))
  ll_seconds = time.time() - ll_start
  logger.write(loop.step, {**test, **{f"ll/{k}": v for k, v in ll.items()}},
               "test")
  train_subset = dataset.train.images[:config.eval.train_examples]
  train_ll = summarize_sums(train.evaluate(
      ll_fn, params, train_subset, config.eval.batch_size,
      after(eval_streams.TRAIN_LOG_LIKELIHOOD), sharded))

  flat_test = test_images.reshape(test_images.shape[0], -1)
  stats = completion_statistics(
      model_config, params, flat_test[:config.eval.statistics_examples],
      after(eval_streams.COMPLETION_STATISTICS),
      config.eval.num_completions)
  chosen = figure_inputs(flat_test, dataset.test.labels, config.eval.num_images)
  figure_images = flat_test[chosen]
  _, c = split_image(model_config, jnp.asarray(figure_images))
  figure_path = workdir_path / "cvae_completions.png"
  if jax.process_index() == 0:
    plot_completions(
        figure_path, model_config, figure_images,
        np.asarray(jax.nn.sigmoid(regressor_logits(model_config,
                                                   params["regressor"], c))),
        np.asarray(sample_completions(model_config, params["cvae"], c,
                                      after(eval_streams.COMPLETIONS),
                                      config.eval.num_completions)),
        title=(f"MNIST completion from the {config.condition.region} region "
               f"(rows {model_config.rows}, cols {model_config.cols}); CVAE "
               f"J={model_config.num_latents}, step {loop.step}"))

  summary = {
      "dataset": config.data.name,
      "data_sources": {"train": dataset.train.source, "test": dataset.test.source},
      "num_train": num_train,
      "condition_region": config.condition.region,
      "observed_rows": list(model_config.rows),
      "observed_cols": list(model_config.cols),
      "num_observed_pixels": int(len(model_config.observed_indices)),
      "num_predicted_pixels": int(len(model_config.hidden_indices)),
      "num_latents": model_config.num_latents,
      "steps": loop.step,
      "resumed_from_step": latest,
      "test_cvae_elbo": test["cvae_elbo"],
      "test_regressor_log_likelihood": test["regressor_log_likelihood"],
      "test_regressor_log_likelihood_stderr": test["regressor_log_likelihood_stderr"],
      "test_examples": test["count"],
      "log_likelihood": ll,
      "train_log_likelihood": train_ll,
      "log_likelihood_samples": config.eval.log_likelihood_samples,
      "log_likelihood_examples": ll["count"],
      "log_likelihood_seconds": ll_seconds,
      "completion_statistics": stats,
      "figure": str(figure_path),
      "figure_inputs": [int(i) for i in chosen],
      "wall_time_s": time.time() - wall_start,
  }
  writers.write_json(workdir_path / "summary.json", summary)
  logger.flush()
  logger.close()
  logging.info("Summary: %s", workdir_path / "summary.json")
  return summary
