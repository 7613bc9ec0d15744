"""QCS on FERPlus: main_QCS_ferplus.py with models/QCS_8cls_ferplus.py."""
from qcs_jax.recipes import base
from qcs_jax.data.transforms import recipe_augment


def get_config():
  c = base.paper_config("qcs", "ferplus")
  c.optim.lr = 3.5e-6                     # main_QCS_ferplus.py --lr (2.5e-6 to fine-tune)
  c.data.batch_size = 24                  # main_QCS_ferplus.py --batch-size
  c.train.epochs = 150                    # main_QCS_ferplus.py --epochs
  c.model.cross_drop = 0.2                # QCS_8cls_ferplus.py VIT_cross drop_ratio
  # vit_model_8cls.py also drops after attn.proj at the block's drop_ratio.
  c.model.cross_proj_drop = 0.2
  c.model.base_drop = c.model.base_proj_drop = 0.0  # QCS_8cls_ferplus.py VIT_base
  c.data.augment = recipe_augment("ferplus")  # resize 232, crop 224 (the script)
  return c
