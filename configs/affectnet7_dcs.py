"""--config=configs/affectnet7_dcs.py: the recipe qcs_jax/recipes/affectnet7_dcs.py."""
from qcs_jax.recipes.affectnet7_dcs import get_config  # noqa: F401
