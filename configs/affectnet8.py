"""--config=configs/affectnet8.py: the recipe qcs_jax/recipes/affectnet8.py."""
from qcs_jax.recipes.affectnet8 import get_config  # noqa: F401
