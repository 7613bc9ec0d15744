"""--config=configs/ferplus_dcs.py: the recipe qcs_jax/recipes/ferplus_dcs.py."""
from qcs_jax.recipes.ferplus_dcs import get_config  # noqa: F401
