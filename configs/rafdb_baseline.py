"""--config=configs/rafdb_baseline.py: the recipe qcs_jax/recipes/rafdb_baseline.py."""
from qcs_jax.recipes.rafdb_baseline import get_config  # noqa: F401
