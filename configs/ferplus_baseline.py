"""--config=configs/ferplus_baseline.py: the recipe qcs_jax/recipes/ferplus_baseline.py."""
from qcs_jax.recipes.ferplus_baseline import get_config  # noqa: F401
