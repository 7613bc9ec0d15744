"""The embedded demo (--config=configs/synthetic.py[:dcs|:baseline]): qcs_jax/recipes/demo.py."""
from qcs_jax.recipes.demo import get_config  # noqa: F401
