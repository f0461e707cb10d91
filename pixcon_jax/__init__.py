"""pixcon_jax: supervised pixel-wise contrastive learning for semantic segmentation in JAX/Flax."""
