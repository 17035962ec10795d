"""Which examples each step trains on, on device or streamed from the host.

The training set is cut into S equal shards, one per device of the data mesh
(shard g holds rows [g * n, (g + 1) * n) with n = N // S; the last N mod S
rows are dropped). Each epoch every shard is permuted with its own key, and a
step's global minibatch is the concatenation of B / S rows from every shard.
This layout is what makes a multi-host run cheap and exact:

  * a process only ever needs the rows of the shards on its devices, a
    contiguous block, so it reads just its slice of the data;
  * the minibatches depend on (seed, epoch, shard) alone, so 1 process with 8
    devices and 2 processes with 4 devices each train on identical batches;
  * small datasets live on the devices and the permutation and slicing run
    inside the compiled program (`gather_batch`), with no host work per step;
    large ones are gathered on the host by `HostOrder`, which computes the very
    same permutations, and streamed to the devices by `Prefetcher`.

A step's randomness and its batch are functions of the step number, so a
resumed run continues exactly.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from avb import random_streams
from avb import config_utils



def shard_size(num_examples: int, num_shards: int, batch_size: int) -> int:
  """Rows per shard, checking that every shard can fill its part of a batch."""
  per_shard = num_examples // num_shards
  if batch_size > num_shards * per_shard:
    raise config_utils.ConfigError(
        f"config.training.batch_size={batch_size} is larger than the "
        f"{num_shards * per_shard} training examples usable on {num_shards} "
        "devices; lower it or use more data")
  return per_shard


def process_rows(num_examples: int, num_shards: int) -> slice:
  """The contiguous rows of the training set this process's shards hold."""
  per_shard = num_examples // num_shards
  local_shards = num_shards // jax.process_count()
  start = jax.process_index() * local_shards * per_shard
  return slice(start, start + local_shards * per_shard)


def epoch_permutations(seed: jax.Array, epoch: jax.Array,
                       shard_ids: jax.Array, per_shard: int) -> jax.Array:
  """Each shard's permutation of its rows for one epoch: [len(shard_ids), n]."""
  key = jax.random.fold_in(random_streams.key(seed, random_streams.Stream.DATA_ORDER),
                           epoch)
  return jax.vmap(lambda s: jax.random.permutation(
      jax.random.fold_in(key, s), per_shard))(shard_ids)


def gather_batch(data: jax.Array, permutations: jax.Array, position: jax.Array,
                 per_shard_batch: int) -> jax.Array:
  """The minibatch at `position` within an epoch, inside a compiled program.

  Args:
    data: the training set laid out as shards, [S, n, ...], sharded over S.
    permutations: [S, n] from `epoch_permutations`.
    position: the step's index within the epoch.
    per_shard_batch: B / S.

  Returns:
    [B, ...]: shard 0's rows first. Every device gathers from its own shard,
    so no data crosses devices.
  """
  rows = jax.lax.dynamic_slice_in_dim(permutations, position * per_shard_batch,
                                      per_shard_batch, axis=1)  # [S, B/S]
  batch = jax.vmap(lambda shard, index: shard[index])(data, rows)  # [S, B/S, ...]
  return batch.reshape(-1, *data.shape[2:])


class HostOrder:
  """`gather_batch` on the host: the same rows, for data that stays in RAM.

  `indices(step)` gives the rows of this process's part of the step's batch,
  as indices into the process's own block of the training set
  (`process_rows`).
  """

  def __init__(self, seed: int, num_shards: int, per_shard: int,
               batch_size: int):
    self.per_shard = per_shard
    self.per_shard_batch = batch_size // num_shards
    self.steps_per_epoch = per_shard // self.per_shard_batch
    local = num_shards // jax.process_count()
    self._shard_ids = np.arange(local) + jax.process_index() * local
    self._seed = seed
    self._epoch = -1
    self._permutations = None
    cpu = jax.local_devices(backend="cpu")[0]
    self._permute = jax.jit(epoch_permutations, static_argnums=3, device=cpu)

  def indices(self, step: int) -> np.ndarray:
    epoch, position = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      self._permutations = np.asarray(self._permute(
          self._seed, epoch, self._shard_ids, self.per_shard))
      self._epoch = epoch
    start = position * self.per_shard_batch
    rows = self._permutations[:, start:start + self.per_shard_batch]
    offsets = np.arange(len(self._shard_ids))[:, None] * self.per_shard
    return (rows + offsets).reshape(-1)


def to_global(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """This process's slice of an array -> the global, sharded jax.Array."""
  return jax.make_array_from_process_local_data(sharding, array)


def device_dataset(images: np.ndarray, num_shards: int,
                   sharding: jax.sharding.Sharding) -> jax.Array:
  """Puts this process's rows (`process_rows`) on its devices as [S, n, ...]."""
  local_shards = num_shards // jax.process_count()
  local = images.reshape(local_shards, -1, *images.shape[1:])
  return to_global(np.ascontiguousarray(local), sharding)


class Prefetcher:
  """Streams minibatches to the devices from a background thread.

  The thread gathers the rows of each step on the host and starts their
  transfer, staying up to `depth` steps ahead, so the training step finds its
  batch already on the device. `wait_seconds` accumulates the time the
  training loop spent blocked on it: the input pipeline's overhead.
  """

  def __init__(self, images: np.ndarray, order: HostOrder,
               sharding: jax.sharding.Sharding, start_step: int,
               transform: Callable[[np.ndarray], np.ndarray] | None = None,
               depth: int = 4):
    self._images = images
    self._order = order
    self._sharding = sharding
    self._transform = transform or (lambda x: x)
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._next_step = start_step
    self._stop = threading.Event()
    self.wait_seconds = 0.0
    self._thread = threading.Thread(target=self._fill, args=(start_step,),
                                    daemon=True)
    self._thread.start()

  def _fill(self, step: int) -> None:
    try:
      while not self._stop.is_set():
        rows = self._images[self._order.indices(step)]
        batch = to_global(self._transform(rows), self._sharding)
        while not self._stop.is_set():
          try:
            self._queue.put((step, batch), timeout=0.1)
            break
          except queue.Full:
            continue
        step += 1
    except Exception as e:  # pylint: disable=broad-except
      self._queue.put((None, e))

  def get(self, step: int) -> jax.Array:
    """The batch of `step`; steps must be asked for in order."""
    start = time.perf_counter()
    got, batch = self._queue.get()
    self.wait_seconds += time.perf_counter() - start
    if got is None:
      raise batch
    if got != step:
      raise RuntimeError(f"prefetcher is at step {got}, asked for {step}")
    return batch

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)
