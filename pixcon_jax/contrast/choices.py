"""The names the contrast settings accept, in one light module (no JAX): the loss, the memory,
the objective and the config schema (`pixcon_jax.config_schema`) all read them from here.
"""
from __future__ import annotations

# Contrast sets (Table 2, Sec. 4.2): the mini-batch, the pixel queue, the region memory.
SOURCES = ("batch", "pixel_memory", "region_memory")
# inter: across images (the paper's cross-image contrast); intra: within the anchor's image.
SCOPES = ("inter", "intra")
# Anchor sampling (Table 3): uniform, or half mispredicted pixels (segmentation-aware hard).
ANCHOR_SAMPLINGS = ("random", "seg_aware_hard")
# Positive / negative sampling (Table 3), and a soft hard miner beyond the paper
# (docs/ABLATIONS.md, "Hard mining that does not collapse").
MININGS = ("random", "hardest", "semi_hard", "hardness_weighted")
# How mining selects its top-k set (`sampling.top_k_mask`).
TOP_K_IMPLS = ("bisect", "sort", "approx")
# Which loss the objective adds: Eq. 3 with memory (paper), the released in-batch code (official)
# or the released memory code (official_mem: per-class queues, contrast/official_mem.py).
RECIPES = ("paper", "official", "official_mem")
# Region memory layout (`memory.init_memory`): one row per image (paper) or a per-class FIFO.
REGION_MODES = ("indexed", "fifo")
