"""The plan of random streams: which key each kind of randomness uses.

Exact resume rests on every random draw being a pure function of the run's
seed, the stream and a position (the step, the epoch, the batch index): no
key is threaded through the Python loop. Every stream is folded into
`jax.random.key(seed)` under a number listed here, once, so no two kinds of
randomness can share a key by accident. A new kind of randomness gets a new
member, never a number written at its call site.

Pure JAX; imports nothing else from avb.
"""

from __future__ import annotations

import enum

import jax


class Stream(enum.IntEnum):
  """Top-level streams, folded into `key(seed)`.

  The numbers are part of every recorded result (tests/
  pinned_smoke_results.json): renumbering one changes the runs that use it.
  """
  # Per-step training noise: fold_in(stream, step), then split into the
  # estimator's noise and the dynamic binarization.
  TRAIN = 0
  # The initial parameters (and MCEM's initial chains).
  INIT = 1
  # Held-out evaluation: fold_in(stream, batch index), with the sub-streams
  # of `EvalStream` for the evaluations after training.
  EVAL = 2
  # Prior samples and pictures (image grids, traversals' random codes).
  PICTURES = 3
  # The epoch's minibatch order: fold_in(stream, epoch), then the shard.
  DATA_ORDER = 4
  # Figure 3's log-likelihood estimates (importance sampling, appendix D).
  FIGURE_LOG_LIKELIHOOD = 5
  # The gradient-variance measurements: fold_in(stream, step).
  GRADIENT_VARIANCE = 6


class EvalStream(enum.IntEnum):
  """Sub-streams of `Stream.EVAL` for the evaluations after training."""
  TEST_LOG_LIKELIHOOD = 1
  TRAIN_LOG_LIKELIHOOD = 3
  COMPLETION_STATISTICS = 4
  COMPLETIONS = 5


def key(seed: int | jax.Array, stream: Stream) -> jax.Array:
  """The key of `stream` under `seed`: `fold_in(key(seed), stream)`."""
  return jax.random.fold_in(jax.random.key(seed), int(stream))


def sub_key(parent: jax.Array, stream: EvalStream) -> jax.Array:
  """`stream` folded into an evaluation key already derived (e.g. vmapped)."""
  return jax.random.fold_in(parent, int(stream))
