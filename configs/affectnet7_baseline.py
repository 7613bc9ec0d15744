"""--config=configs/affectnet7_baseline.py: the recipe qcs_jax/recipes/affectnet7_baseline.py."""
from qcs_jax.recipes.affectnet7_baseline import get_config  # noqa: F401
