"""Times every convolution algorithm on the convs of a model (forward + both gradients).

Traces one training forward of the model, collects its distinct conv shapes, and for each
times `value_and_grad` of a conv (w.r.t. input and kernel) with every applicable algorithm
of `pixcon_jax.cpu.conv`. Prints one JSON line per shape (count in the model, GFLOP of
the forward, median seconds per algorithm, the one "auto" picks), then a summary line with
the model total per algorithm (sum over shapes of count x time), for "auto" and for the
best choice per shape: how far the "auto" thresholds are from this machine's optimum.

Isolated timings miss one effect of the full step (see `choose_impl`): inside a network,
XLA:CPU fuses the producers of a conv's input into the transposes of the native op's weight
gradient. `scripts/bench_train.py --conv_impl=...` measures whole steps.

  python scripts/bench_conv.py                                  # hrnet_w48_contrast, 2 x 256x512
  python scripts/bench_conv.py --model=deeplab_v3_contrast --crop=512,1024 --batch=1
"""
import collections
import json
import statistics
import time

from absl import app
from absl import flags

from pixcon_jax import cli

flags.DEFINE_string("model", "hrnet_w48_contrast", "Registered model name.")
flags.DEFINE_integer("batch", 2, "Batch size.")
flags.DEFINE_list("crop", ["256", "512"], "Input h,w.")
flags.DEFINE_integer("num_classes", 19, "Classes.")
flags.DEFINE_integer("repeats", 3, "Timed calls per algorithm (median reported).")
FLAGS = flags.FLAGS


def conv_shapes(name, num_classes, image_shape):
  """{(x_shape, kernel_shape, stride, padding, dilation): count} of a training forward."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.extend import core as jex_core  # pylint: disable=g-import-not-at-top
  from pixcon_jax import models  # pylint: disable=g-import-not-at-top
  # With the native op every conv is one `conv_general_dilated` in the jaxpr.
  model = models.build_model(name, num_classes=num_classes, conv_impl="xla")
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1,) + image_shape[1:]), train=False))
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)}))(
          variables, jax.ShapeDtypeStruct(image_shape, jnp.float32))
  shapes = collections.Counter()

  def walk(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        prm = eqn.params
        shapes[(tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape),
                prm["window_strides"][0], prm["padding"][0][0], prm["rhs_dilation"][0])] += 1
      for sub in jex_core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  return shapes


def time_conv(x_shape, k_shape, stride, padding, dilation, impl, repeats):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pixcon_jax.cpu import conv  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape, jnp.float32)
  k = jax.random.normal(jax.random.PRNGKey(1), k_shape, jnp.float32) * 0.05

  def loss(x, k):
    y = conv.conv2d(x, k, stride=stride, padding=padding, dilation=dilation, impl=impl)
    return 0.5 * jnp.sum(jnp.square(y))

  fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
  jax.block_until_ready(fn(x, k))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(x, k))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from pixcon_jax.cpu import conv  # pylint: disable=g-import-not-at-top
  h, w = cli.int_list(FLAGS.crop, "crop", length=2)
  shapes = conv_shapes(FLAGS.model, FLAGS.num_classes, (FLAGS.batch, h, w, 3))
  totals = collections.Counter()
  for (xs, ks, s, p, d), count in sorted(shapes.items(), key=lambda kv: -kv[1]):
    ho, wo = conv.output_size(xs[1], ks[0], s, p, d), conv.output_size(xs[2], ks[1], s, p, d)
    gflop = 2 * xs[0] * ho * wo * ks[0] * ks[1] * ks[2] * ks[3] / 1e9
    impls = ["xla", "matmul"] + (["winograd"] if conv.winograd_applies(ks, s, d) else [])
    secs = {i: time_conv(xs, ks, s, p, d, i, FLAGS.repeats) for i in impls}
    auto = conv.choose_impl(xs, ks, stride=s, padding=p, dilation=d, dtype="float32",
                            backend=jax.default_backend())
    for i, t in secs.items():
      totals[i] += count * t
    totals["auto"] += count * secs[auto]
    totals["best"] += count * min(secs.values())
    print(json.dumps({"x": xs, "kernel": ks, "stride": s, "padding": p, "dilation": d,
                      "count": count, "fwd_gflop": round(gflop, 3), "auto": auto,
                      "seconds": {i: round(t, 5) for i, t in secs.items()}}), flush=True)
  print(json.dumps({"model": FLAGS.model, "batch": FLAGS.batch, "crop": [h, w],
                    "platform": jax.default_backend(), "convs": sum(shapes.values()),
                    "total_seconds": {k: round(v, 3) for k, v in totals.items()}}), flush=True)


if __name__ == "__main__":
  cli.run(main)
