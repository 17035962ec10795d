r"""A PyTorch reference of the MNIST AEVB training step (for benchmarks).

The same model and training step as the JAX default MNIST config (see
`benchmarks/train_throughput.py`), written in idiomatic PyTorch, so that the
benchmark suite can compare the JAX step's throughput against it:

  * encoder  x [B, 784] -> Linear(784, 500) -> tanh -> two separate heads,
             Linear(500, 20) for the mean and Linear(500, 20) for the
             log-variance (two heads, not one fused Linear(500, 40), as the
             JAX model's two Dense layers);
  * z = mean + exp(0.5 log_var) * eps, eps ~ N(0, I), one sample (L = 1);
  * decoder  z [B, 20] -> Linear(20, 500) -> tanh -> Linear(500, 784) ->
             Bernoulli logits;
  * loss (estimator B, negated):
        reconstruction_i = -BCE_with_logits(logits_i, x_i).sum()
        kl_i             = 0.5 * sum_j(exp(log_var) - 1 - log_var + mean^2)
                           (written with expm1, as the JAX code does)
        elbo             = mean_i(reconstruction_i - kl_i)
        loss             = -elbo + 0.5 * sum(params^2) / N
    i.e. a N(0, I) weight prior spread over the N training examples;
  * init: every weight and bias from N(0, 0.01^2);
  * Adagrad(lr=0.02, initial_accumulator_value=0, eps=1e-8). (PyTorch adds
    eps outside the square root, optax inside; at the accumulator sizes seen
    in training the difference is immaterial.);
  * minibatches of 100 gathered by index from one [N, 784] float32 tensor in
    [0, 1] (no DataLoader), a fresh random permutation every epoch, the
    remainder (N % batch_size) dropped.

Per step the trainer also computes the metrics the JAX step logs (loss,
elbo, reconstruction, kl, kl_per_latent [20], weight_log_prior, l2_grads =
global gradient norm, l2_params = global parameter norm after the update)
and adds them into one accumulator tensor, with no `.item()` per step; the
accumulator is read (the only host synchronisation) once, at the end of each
epoch. Not reproduced: the JAX step's non-finite guard (it keeps the last
good state when a loss or gradient is not finite).

Variants:
  eager          plain nn.Module + torch.optim.Adagrad (default for-loop
                 implementation on CPU).
  compiled       torch.compile of the model forward + loss (AOTAutograd also
                 compiles its backward, run by loss.backward()), and a second
                 torch.compile of the update: gradient norm, opt.step(),
                 parameter norm and the metric accumulation. Dynamo splits
                 the update into 3 graphs at the graph breaks PyTorch's
                 optimizer inserts on purpose around step() (to set no_grad
                 for AOTAutograd): 4 graphs in all, no recompiles after
                 warm-up. Raises
                 VariantUnavailable (with the reason) when compilation fails,
                 e.g. with no C++ compiler.
  eager_foreach  eager with Adagrad(foreach=True).
  eager_fused    eager with Adagrad(fused=True).

API:
  make_trainer(images, variant, seed=0, batch_size=100, lr=0.02,
               num_threads=None, num_train=None) -> Trainer
  Trainer.warmup()       runs a few steps (compiles the compiled variant) and
                         then restores parameters, optimizer state and RNG,
                         so warm-up does not change the training trajectory.
  Trainer.run_epoch()    one epoch of N // batch_size steps, ending with the
                         read of the accumulated metrics; returns its
                         time.perf_counter wall time in seconds.
  Trainer.metrics()      the mean metrics of the last epoch: dict of floats,
                         "kl_per_latent" a float32 np.ndarray [20].
  flops_per_example()    exact matmul FLOPs of one training step per example.

Standalone:
  python -m benchmarks.torch_reference
  python benchmarks/torch_reference.py --epochs=3 --variants=eager,compiled
"""

from __future__ import annotations

import argparse
import gzip
import os
import pathlib
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

DATA_DIM = 784
HIDDEN = 500
NUM_LATENTS = 20
INIT_STD = 0.01

VARIANTS = ("eager", "compiled")
EXTRA_VARIANTS = ("eager_foreach", "eager_fused")
ALL_VARIANTS = VARIANTS + EXTRA_VARIANTS

# Layout of the per-step metrics vector (scalars first, then kl_per_latent).
_SCALARS = ("loss", "elbo", "reconstruction", "kl", "weight_log_prior",
            "l2_grads", "l2_params")
_NUM_METRICS = len(_SCALARS) + NUM_LATENTS
_WARMUP_STEPS = 3


class VariantUnavailable(RuntimeError):
  """The requested variant cannot run on this machine (the message says why)."""


# ----------------------------------------------------------------------------
# FLOPs.


def flops_per_example(data_dim: int = DATA_DIM, hidden: int = HIDDEN,
                      num_latents: int = NUM_LATENTS,
                      num_samples: int = 1) -> dict[str, int]:
  """Exact matmul FLOPs of one training step, per example.

  A dense layer with m inputs and n outputs costs 2*m*n FLOPs per example for
  each of: the forward y = x W; the weight gradient dW = x^T g (every layer
  has trainable weights); the input gradient dx = g W^T, for every layer
  except the encoder's first, whose input (the data) is not differentiated.
  The decoder (run once per sample, L = num_samples times) does need its
  input gradient: it flows back into the encoder through z = mean +
  exp(log_var / 2) * eps. The mean and log-variance heads are two m x J
  layers.

  Ignored: bias adds, tanh, the sampling, the likelihood, the KL, the weight
  prior, the norms and Adagrad's update (all elementwise, O(D + H) per
  example or O(#params) per step, small beside the matmuls).

  For the default model: forward 1,628,000; weight_grads 1,628,000;
  input_grads 844,000; total 4,100,000 (about 2.52x the forward).
  """
  encoder = [(data_dim, hidden), (hidden, num_latents), (hidden, num_latents)]
  decoder = [(num_latents, hidden), (hidden, data_dim)]

  def cost(layers):
    return sum(2 * m * n for m, n in layers)

  forward = cost(encoder) + num_samples * cost(decoder)
  weight_grads = forward
  input_grads = cost(encoder[1:]) + num_samples * cost(decoder)
  return {"forward": forward, "weight_grads": weight_grads,
          "input_grads": input_grads,
          "total": forward + weight_grads + input_grads}


# ----------------------------------------------------------------------------
# The model.


class VAE(nn.Module):
  """784-500-20 tanh MLP encoder and 20-500-784 tanh MLP Bernoulli decoder."""

  def __init__(self, data_dim: int = DATA_DIM, hidden: int = HIDDEN,
               num_latents: int = NUM_LATENTS):
    super().__init__()
    self.enc_hidden = nn.Linear(data_dim, hidden)
    self.enc_mean = nn.Linear(hidden, num_latents)
    self.enc_log_var = nn.Linear(hidden, num_latents)
    self.dec_hidden = nn.Linear(num_latents, hidden)
    self.dec_logits = nn.Linear(hidden, data_dim)

  def reset_parameters_paper(self, std: float, generator: torch.Generator):
    """Every weight and bias from N(0, std^2)."""
    with torch.no_grad():
      for p in self.parameters():
        p.normal_(0.0, std, generator=generator)

  def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = torch.tanh(self.enc_hidden(x))
    return self.enc_mean(h), self.enc_log_var(h)

  def decode(self, z: torch.Tensor) -> torch.Tensor:
    return self.dec_logits(torch.tanh(self.dec_hidden(z)))


def loss_and_metrics(model: VAE, x: torch.Tensor, eps: torch.Tensor,
                     num_train: int) -> tuple[torch.Tensor, torch.Tensor]:
  """The negated AEVB objective of a minibatch, and its metrics.

  Args:
    model: the VAE.
    x: [B, D] data in [0, 1].
    eps: [B, J] standard normal noise (L = 1).
    num_train: N, the number of training examples (weight prior / N).

  Returns:
    (loss, metrics): metrics is a detached vector [5 + J]: loss, elbo,
    reconstruction, kl, weight_log_prior, then kl_per_latent (batch means).
  """
  mean, log_var = model.encode(x)
  z = mean + torch.exp(0.5 * log_var) * eps
  logits = model.decode(z)
  reconstruction = -F.binary_cross_entropy_with_logits(
      logits, x, reduction="none").sum(1)  # [B]
  kl_per_latent = 0.5 * (torch.expm1(log_var) - log_var + mean.square())
  kl = kl_per_latent.sum(1)  # [B]
  elbo = (reconstruction - kl).mean()
  log_prior = -0.5 * sum(p.square().sum() for p in model.parameters())
  loss = -(elbo + log_prior / num_train)
  metrics = torch.cat([
      torch.stack([loss, elbo, reconstruction.mean(), kl.mean(), log_prior]),
      kl_per_latent.mean(0)]).detach()
  return loss, metrics


# ----------------------------------------------------------------------------
# The trainer.


class Trainer:
  """Trains the VAE one epoch at a time; see the module docstring."""

  def __init__(self, images: np.ndarray, variant: str, seed: int = 0,
               batch_size: int = 100, lr: float = 0.02,
               num_train: int | None = None):
    if variant not in ALL_VARIANTS:
      raise ValueError(f"variant={variant!r}: allowed: {', '.join(ALL_VARIANTS)}")
    images = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    if images.shape[1] != DATA_DIM:
      raise ValueError(f"images must be [N, {DATA_DIM}], got {images.shape}")
    self.variant = variant
    self.batch_size = batch_size
    self.num_examples = len(images)
    self.steps_per_epoch = self.num_examples // batch_size
    if self.steps_per_epoch < 1:
      raise ValueError(f"{self.num_examples} images < batch_size={batch_size}")
    self.num_train = num_train if num_train is not None else self.num_examples
    self._data = torch.from_numpy(np.ascontiguousarray(images))

    self._gen = torch.Generator().manual_seed(seed)
    self.model = VAE()
    self.model.reset_parameters_paper(INIT_STD, self._gen)
    self._params = list(self.model.parameters())
    opt_kwargs = {}
    if variant == "eager_foreach":
      opt_kwargs["foreach"] = True
    elif variant == "eager_fused":
      opt_kwargs["fused"] = True
    self.opt = torch.optim.Adagrad(self._params, lr=lr,
                                   initial_accumulator_value=0.0, eps=1e-8,
                                   **opt_kwargs)
    self._acc = torch.zeros(_NUM_METRICS)
    self._last_metrics: dict | None = None

    if variant == "compiled":
      self._forward = torch.compile(self._forward_eager)
      self._update = torch.compile(self._update_eager)
    else:
      self._forward = self._forward_eager
      self._update = self._update_eager

  # The two halves of a step; the compiled variant compiles each.

  def _forward_eager(self, x: torch.Tensor, eps: torch.Tensor):
    return loss_and_metrics(self.model, x, eps, self.num_train)

  def _update_eager(self, metrics: torch.Tensor) -> None:
    with torch.no_grad():
      grad_norm = torch.sqrt(sum(p.grad.square().sum() for p in self._params))
      self.opt.step()
      param_norm = torch.sqrt(sum(p.square().sum() for p in self._params))
      self._acc.add_(torch.cat([metrics, grad_norm[None], param_norm[None]]))

  def _step(self, x: torch.Tensor) -> None:
    eps = torch.randn(x.shape[0], NUM_LATENTS, generator=self._gen)
    self.opt.zero_grad(set_to_none=True)
    loss, metrics = self._forward(x, eps)
    loss.backward()
    self._update(metrics)

  # Public API.

  def warmup(self, steps: int = _WARMUP_STEPS) -> None:
    """Runs `steps` steps (compiling where needed), then undoes them.

    Parameters, Adagrad state (in place, so compiled code's guards still
    hold), the RNG and the accumulator are restored afterwards, so warm-up
    leaves the training trajectory unchanged.
    """
    saved_params = [p.detach().clone() for p in self._params]
    saved_state = {id(p): {k: v.clone() for k, v in self.opt.state[p].items()}
                   for p in self._params}
    saved_rng = self._gen.get_state()
    for i in range(steps):
      start = (i * self.batch_size) % (self.steps_per_epoch * self.batch_size)
      self._step(self._data[start:start + self.batch_size])
    with torch.no_grad():
      for p, saved in zip(self._params, saved_params):
        p.copy_(saved)
        for k, v in self.opt.state[p].items():
          v.copy_(saved_state[id(p)][k])
      self._acc.zero_()
    self.opt.zero_grad(set_to_none=True)
    self._gen.set_state(saved_rng)

  def run_epoch(self) -> float:
    """One epoch (N // batch_size steps) ending in a metrics read; seconds."""
    start = time.perf_counter()
    self._acc.zero_()
    perm = torch.randperm(self.num_examples, generator=self._gen)
    b = self.batch_size
    for i in range(self.steps_per_epoch):
      self._step(self._data[perm[i * b:(i + 1) * b]])
    means = (self._acc / self.steps_per_epoch).numpy().copy()  # the sync
    elapsed = time.perf_counter() - start
    metrics = {name: float(means[i]) for i, name in enumerate(_SCALARS[:5])}
    metrics["kl_per_latent"] = means[5:5 + NUM_LATENTS].astype(np.float32)
    metrics["l2_grads"] = float(means[5 + NUM_LATENTS])
    metrics["l2_params"] = float(means[6 + NUM_LATENTS])
    self._last_metrics = metrics
    return elapsed

  def metrics(self) -> dict:
    """Mean metrics of the last epoch (floats; kl_per_latent np [20])."""
    if self._last_metrics is None:
      raise RuntimeError("no epoch has run yet")
    return dict(self._last_metrics)


def make_trainer(images: np.ndarray, variant: str, seed: int = 0,
                 batch_size: int = 100, lr: float = 0.02,
                 num_threads: int | None = None,
                 num_train: int | None = None) -> Trainer:
  """A Trainer for `variant` (see ALL_VARIANTS); sets torch's thread count.

  num_threads defaults to os.cpu_count() (torch.set_num_threads is
  process-wide). num_train (N of the weight prior) defaults to len(images).
  For "compiled", compilation is triggered here by `Trainer.warmup()` (which
  undoes its steps); a failed torch.compile raises VariantUnavailable with
  the reason, so the caller can report it and go on.
  """
  torch.set_num_threads(num_threads or os.cpu_count() or 1)
  trainer = Trainer(images, variant, seed=seed, batch_size=batch_size, lr=lr,
                    num_train=num_train)
  if variant == "compiled":
    try:
      trainer.warmup()
    except Exception as e:  # pylint: disable=broad-except
      reason = f"torch.compile failed: {type(e).__name__}: {e}"
      raise VariantUnavailable(reason[:2000]) from e
  return trainer


# ----------------------------------------------------------------------------
# Standalone.


def load_mnist_test_images(data_dir: str | os.PathLike | None = None) -> np.ndarray:
  """The 10,000 MNIST test images, float32 [10000, 784] in [0, 1]."""
  if data_dir is None:
    repo_root = pathlib.Path(__file__).resolve().parent.parent
    data_dir = os.environ.get("AVB_DATA_DIR",
                              repo_root.parent / "shared" / "data")
  path = pathlib.Path(data_dir) / "mnist" / "t10k-images-idx3-ubyte.gz"
  with gzip.open(path, "rb") as f:
    raw = f.read()
  magic, count, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
  if magic != 2051:
    raise ValueError(f"{path}: not an IDX image file (magic {magic})")
  pixels = np.frombuffer(raw, dtype=np.uint8, offset=16)
  return (pixels.reshape(count, rows * cols).astype(np.float32) / 255.0)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variants", default=",".join(ALL_VARIANTS))
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--threads", type=int, default=None,
                      help="torch threads (default: os.cpu_count())")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data_dir", default=None,
                      help="default: $AVB_DATA_DIR or <repo>/../shared/data")
  args = parser.parse_args()

  images = load_mnist_test_images(args.data_dir)
  flops = flops_per_example()
  print(f"torch {torch.__version__}, threads "
        f"{args.threads or os.cpu_count()}, images {images.shape}")
  print("matmul FLOPs per example: " +
        ", ".join(f"{k} {v:,}" for k, v in flops.items()))
  for variant in args.variants.split(","):
    print(f"\n[{variant}]")
    start = time.perf_counter()
    try:
      trainer = make_trainer(images, variant, seed=args.seed,
                             num_threads=args.threads)
      trainer.warmup()
    except VariantUnavailable as e:
      print(f"  unavailable: {e}")
      continue
    print(f"  build + warm-up: {time.perf_counter() - start:.1f} s")
    for epoch in range(1, args.epochs + 1):
      seconds = trainer.run_epoch()
      m = trainer.metrics()
      rate = trainer.steps_per_epoch * trainer.batch_size / seconds
      gflops = rate * flops["total"] / 1e9
      print(f"  epoch {epoch}: {seconds:.3f} s, {rate:,.0f} examples/s, "
            f"{gflops:.2f} GFLOP/s; train elbo {m['elbo']:.2f} "
            f"(recon {m['reconstruction']:.2f}, kl {m['kl']:.2f}), "
            f"loss {m['loss']:.2f}, |g| {m['l2_grads']:.2f}, "
            f"|p| {m['l2_params']:.2f}")


if __name__ == "__main__":
  main()
