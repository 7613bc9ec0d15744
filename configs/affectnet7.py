"""--config=configs/affectnet7.py: the recipe qcs_jax/recipes/affectnet7.py."""
from qcs_jax.recipes.affectnet7 import get_config  # noqa: F401
