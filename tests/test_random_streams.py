"""The plan of random streams: distinct numbers, keys as documented."""

import jax
import numpy as np

from avb import random_streams


def test_streams_have_distinct_numbers():
  values = [int(s) for s in random_streams.Stream]
  assert len(values) == len(set(values))
  sub = [int(s) for s in random_streams.EvalStream]
  assert len(sub) == len(set(sub))


def test_key_is_the_seed_key_folded_with_the_stream():
  for stream in random_streams.Stream:
    want = jax.random.fold_in(jax.random.key(7), int(stream))
    np.testing.assert_array_equal(
        jax.random.key_data(random_streams.key(7, stream)),
        jax.random.key_data(want))
