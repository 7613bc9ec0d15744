"""qcs_jax: QCS / DCS facial expression recognition in JAX/Flax."""
