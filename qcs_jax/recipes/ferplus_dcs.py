"""DCS on FERPlus: main_DCS_ferplus.py with models/DCS_8cls_ferplus.py."""
from qcs_jax.recipes import base
from qcs_jax.data.transforms import recipe_augment


def get_config():
  c = base.paper_config("dcs", "ferplus")
  c.train.epochs = 150                    # main_DCS_ferplus.py --epochs
  c.data.batch_size = 24                  # main_DCS_ferplus.py --batch-size
  c.optim.lr = 8e-6                       # main_DCS_ferplus.py --lr
  # DCS_8cls_ferplus.py VIT_cross drop_ratio; vit_model_8cls.py uses it after attn.proj too.
  c.model.cross_drop = c.model.cross_proj_drop = 0.2
  c.model.base_drop = c.model.base_proj_drop = 0.0  # DCS_8cls_ferplus.py VIT_base
  # main_DCS_ferplus.py resizes to 234 (QCS: 232) before the 224 crop.
  c.data.augment = recipe_augment("ferplus_dcs")
  return c
