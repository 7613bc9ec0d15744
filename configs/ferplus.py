"""--config=configs/ferplus.py: the recipe qcs_jax/recipes/ferplus.py."""
from qcs_jax.recipes.ferplus import get_config  # noqa: F401
