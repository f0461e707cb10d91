"""Tests of pixcon_jax.contrast.labels (PyTorch legacy-nearest label downsampling)."""
import jax
import jax.numpy as jnp
import numpy as np

from pixcon_jax.contrast.labels import downsample_labels, legacy_nearest_indices


def test_legacy_nearest_takes_every_fourth_row_for_64_to_16():
  np.testing.assert_array_equal(legacy_nearest_indices(64, 16), np.arange(0, 64, 4))


def test_legacy_nearest_uses_float32_product_not_exact_rational():
  # 26 -> 22 at o = 11: the exact 11 * 26 / 22 is 13, but float32(11) * float32(26 / 22) is
  # 12.999999, so PyTorch (and we) take row 12.
  idx = legacy_nearest_indices(26, 22)
  exact = np.arange(22) * 26 // 22
  f32 = np.floor(np.arange(22, dtype=np.float32) * (np.float32(26) / np.float32(22)))
  np.testing.assert_array_equal(idx, f32.astype(np.int32))
  assert idx[11] != exact[11]


def test_legacy_nearest_is_identity_at_same_size_and_clamped():
  np.testing.assert_array_equal(legacy_nearest_indices(7, 7), np.arange(7))
  for n_in, n_out in ((39, 33), (78, 33), (5, 3), (128, 17)):
    idx = legacy_nearest_indices(n_in, n_out)
    assert idx.min() >= 0 and idx.max() <= n_in - 1 and np.all(np.diff(idx) >= 0)


def test_downsample_labels_gathers_rows_and_columns_and_jits():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 19, (2, 39, 78)).astype(np.int32)
  label[0, :3] = 255
  out = jax.jit(downsample_labels, static_argnums=1)(jnp.asarray(label), (33, 33))
  rows, cols = legacy_nearest_indices(39, 33), legacy_nearest_indices(78, 33)
  assert out.shape == (2, 33, 33) and out.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(out), label[:, rows][:, :, cols])
