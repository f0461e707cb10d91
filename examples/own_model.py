"""The pixel-contrast loss and its memory bank in your own JAX train step.

A toy Flax segmenter (logits + an L2-normalised embedding at 1/4 scale), an optax optimizer and
a jitted step that adds `pixcon_jax.contrast`'s loss to the cross-entropy and updates the memory
bank after the step. It trains on the procedural street scenes of pixcon_jax/data/synthetic.py
and prints the losses; the contrast loss falls. About a minute on 2 CPU cores:

  python examples/own_model.py [--steps=60]

docs/LIBRARY.md explains each call.
"""
import argparse
import pathlib
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # Run from a checkout.
from pixcon_jax import contrast  # pylint: disable=g-import-not-at-top,wrong-import-position
from pixcon_jax.data import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_CLASSES = 8  # synthetic.CLASS_NAMES
IMAGE_SIZE = (48, 96)
NUM_IMAGES = 64
BATCH = 8


class ToySegmenter(nn.Module):
  """Class logits and a unit embedding per pixel of the 1/4-scale grid."""
  num_classes: int = NUM_CLASSES
  dim: int = 16

  @nn.compact
  def __call__(self, image):  # [B, H, W, 3] -> [B, H/4, W/4, C], [B, H/4, W/4, D]
    x = nn.relu(nn.Conv(24, (3, 3), strides=2)(image))
    x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    logits = nn.Conv(self.num_classes, (1, 1))(x)
    embedding = nn.Conv(self.dim, (1, 1))(nn.relu(nn.Conv(32, (1, 1))(x)))  # projection head
    embedding = embedding / jnp.maximum(jnp.linalg.norm(embedding, axis=-1, keepdims=True), 1e-6)
    return logits, embedding


def synthetic_scenes(num: int):
  """[N, H, W, 3] float32 images in [-1, 1], [N, H, W] int32 labels, [N] int32 image ids."""
  scenes = [synthetic.render(seed=0, index=i, size=IMAGE_SIZE) for i in range(num)]
  images = np.stack([s[0] for s in scenes]).astype(np.float32) / 127.5 - 1.0
  labels = np.stack([s[1] for s in scenes]).astype(np.int32)
  return images, labels, np.arange(num, dtype=np.int32)


# The project's defaults (the paper's, with random positives and negatives: docs/ABLATIONS.md
# "Departures") with sizes for a toy model and 64 images. The contrast set is the memory bank
# ("from the memory bank M"), so it is empty at step 0 and fills during the first pass.
settings = contrast.make_settings(
    num_classes=NUM_CLASSES, anchors_per_class=16, num_positives=64, num_negatives=128,
    positive_pool=640, negative_pool=1280)
FILL_STEPS = NUM_IMAGES // BATCH  # One pass: every image's keys are in the bank.
model = ToySegmenter()
optimizer = optax.adam(3e-3)


@jax.jit
def train_step(params, opt_state, memory, image, label, image_id, key):
  """One SGD step on CE + contrast (lambda = 1, Eq. 4); the bank is updated after the loss."""
  loss_key, memory_key = jax.random.split(key)

  def loss_fn(params):
    logits, embedding = model.apply(params, image)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits, contrast.align_labels(label, logits.shape[1:3])).mean()
    contrast_value, metrics = contrast.contrast_loss(
        embedding, label, memory, loss_key, settings=settings, predict=logits,
        image_id=image_id)
    return ce + contrast_value, (ce, contrast_value, metrics, embedding)

  (loss, (ce, contrast_value, metrics, embedding)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  memory = contrast.update_memory(memory, embedding, label, memory_key, settings=settings,
                                  image_id=image_id)
  return params, opt_state, memory, dict(metrics, loss=loss, ce=ce, contrast=contrast_value)


def main(steps: int) -> None:
  images, labels, image_ids = synthetic_scenes(NUM_IMAGES)
  key = jax.random.key(0)
  params = model.init(key, jnp.zeros((1,) + IMAGE_SIZE + (3,)))
  opt_state = optimizer.init(params)
  memory = contrast.create_memory(settings=settings, dim=model.dim, num_images=NUM_IMAGES)
  history = []
  t0 = time.time()
  for step in range(steps):
    batch = np.random.default_rng(step).choice(NUM_IMAGES, BATCH, replace=False)
    params, opt_state, memory, m = train_step(
        params, opt_state, memory, images[batch], labels[batch], image_ids[batch],
        jax.random.fold_in(key, step))
    history.append(float(m["contrast"]))
    if step % 10 == 0 or step == steps - 1:
      print(f"step {step:3d}  loss {float(m['loss']):.3f}  ce {float(m['ce']):.3f}  "
            f"contrast {float(m['contrast']):.3f}  valid anchors "
            f"{float(m['valid_anchor_fraction']):.2f}", flush=True)
  # From the first step with a full bank: before it, the loss grows with the contrast set.
  window = max(1, (steps - FILL_STEPS) // 4)
  first = np.mean(history[FILL_STEPS:FILL_STEPS + window])
  last = np.mean(history[-window:])
  print(f"contrast loss: {first:.4f} -> {last:.4f} (mean of {window} steps from step {FILL_STEPS}, "
        f"the bank full, and of the last {window}; {time.time() - t0:.0f} s)")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=60)
  main(parser.parse_args().steps)
