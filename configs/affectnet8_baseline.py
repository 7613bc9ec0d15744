"""--config=configs/affectnet8_baseline.py: the recipe qcs_jax/recipes/affectnet8_baseline.py."""
from qcs_jax.recipes.affectnet8_baseline import get_config  # noqa: F401
