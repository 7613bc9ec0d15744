"""--config=configs/affectnet8_dcs.py: the recipe qcs_jax/recipes/affectnet8_dcs.py."""
from qcs_jax.recipes.affectnet8_dcs import get_config  # noqa: F401
