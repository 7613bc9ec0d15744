"""DCS on RAF-DB: main_DCS_raf_db.py with models/DCS_7cls_raf_db.py."""
from qcs_jax.recipes import base
from qcs_jax.data.transforms import recipe_augment


def get_config():
  c = base.paper_config("dcs", "rafdb")
  c.data.batch_size = 48                  # main_DCS_raf_db.py --batch-size
  c.optim.lr = 9e-6                       # main_DCS_raf_db.py --lr
  c.train.epochs = 200                    # main_DCS_raf_db.py --epochs
  c.model.cross_drop = 0.2                # DCS_7cls_raf_db.py VIT_cross drop_ratio
  c.model.base_drop = 0.0                 # DCS_7cls_raf_db.py VIT_base drop_ratio
  c.data.augment = recipe_augment("rafdb")  # main_DCS_raf_db.py data_transforms
  return c
