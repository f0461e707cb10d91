"""scripts/xla_cost.collective_bytes: collectives counted with their loops' trip counts."""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

import xla_cost  # scripts/


def _compiled_text(fn, *args):
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  sharded = jax.shard_map(fn, mesh=mesh, in_specs=(P("data"),) * len(args), out_specs=P("data"))
  return jax.jit(sharded).lower(*args).compile().as_text()


def test_collectives_in_a_loop_count_once_per_trip():
  x = jnp.ones((10,), jnp.float32)  # 40 bytes

  def five_psums(x):
    return lax.fori_loop(0, 5, lambda i, c: c + lax.psum(x * i, "data"), jnp.zeros_like(x))

  assert xla_cost.collective_bytes(_compiled_text(five_psums, x)) == 5 * 40


def test_loops_of_unknown_length_count_the_stated_bound():
  x = jnp.ones((10,), jnp.float32)

  def until_large(x):
    total = lambda c: lax.psum(jnp.sum(c), "data")
    return lax.while_loop(lambda c: total(c) < 1e3, lambda c: c + 1.0, x)

  text = _compiled_text(until_large, x)
  assert xla_cost.collective_bytes(text, unknown_trip_count=7) == 7 * 4
  assert xla_cost.collective_bytes(text) == 32 * 4


def test_no_collective_no_bytes():
  assert xla_cost.collective_bytes(_compiled_text(lambda x: x * 2.0, jnp.ones(4))) == 0


def test_a_conditional_counts_its_most_expensive_branch():
  x = jnp.ones((10,), jnp.float32)

  def maybe_gather(x):
    big = lambda x: lax.psum(jnp.concatenate([x, x, x]), "data")[:10]  # 120 bytes
    small = lambda x: lax.psum(x, "data")  # 40 bytes
    return lax.cond(lax.psum(jnp.sum(x), "data") > 0, big, small, x)  # + 4 bytes

  assert xla_cost.collective_bytes(_compiled_text(maybe_gather, x)) == 120 + 4
