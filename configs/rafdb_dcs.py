"""--config=configs/rafdb_dcs.py: the recipe qcs_jax/recipes/rafdb_dcs.py."""
from qcs_jax.recipes.rafdb_dcs import get_config  # noqa: F401
