"""--config=configs/rafdb.py: the recipe qcs_jax/recipes/rafdb.py."""
from qcs_jax.recipes.rafdb import get_config  # noqa: F401
