"""The variable names of the models are pinned: the PyTorch converter and the goldens address them.

The digests below are of the sorted "path shape" lines of tiny models of each family, taken
before models took their conv and norm injected (issue 20); a refactor that renames or moves a
module changes them. The per-line check prints what differs.
"""
import hashlib

import jax
import jax.numpy as jnp
import pytest

from pixcon_jax import models

_HRNET = dict(widths=(4, 8, 16, 32), stage_modules=(1, 1, 1), num_blocks=1, stem_width=8,
              layer1_planes=4, layer1_blocks=1, proj_dim=8, ocr_channels=8, ocr_key_channels=4)
_RESNET = dict(stage_depths=(1, 1, 2, 1), width=4, stem_width=4, proj_dim=8)
# name -> (overrides, number of variables, sha256 prefix of the sorted "path shape" lines).
PINNED = {
    "hrnet_w18_ocr_contrast": (_HRNET, 331, "cce5bc7ec42fcb35"),
    "ocr_r101_contrast": (dict(_RESNET, ocr_channels=8, ocr_key_channels=4), 176,
                          "d7ddf27adb09f8e6"),
    "deeplab_v3_contrast": (dict(_RESNET, aspp_features=8, aux_features=8), 163,
                            "28214c116023767f"),
}


def variable_lines(name, overrides, **build):
  model = models.build_model(name, num_classes=3, **overrides, **build)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                                train=False))
  return sorted(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)}"
                for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0])


@pytest.mark.parametrize("name", sorted(PINNED))
def test_variable_names_and_shapes_are_pinned(name):
  overrides, count, digest = PINNED[name]
  lines = variable_lines(name, overrides)
  assert len(lines) == count, lines
  assert hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16] == digest
  # The conv algorithm and the platform change the graph, never a name.
  assert variable_lines(name, overrides, conv_impl="matmul", platform="tpu") == lines
  assert any(line.startswith(f"['params']['{models.BACKBONE_PREFIX}']") for line in lines)
