"""QCS on RAF-DB: main_QCS_raf_db.py with models/QCS_7cls_raf_db.py."""
from qcs_jax.recipes import base
from qcs_jax.data.transforms import recipe_augment


def get_config():
  c = base.paper_config("qcs", "rafdb")
  c.data.batch_size = 24                  # main_QCS_raf_db.py --batch-size
  # Paper appendix: 4e-6. The script's default 3e-6 is the paper's rate for
  # fine-tuning from an AffectNet-8 QCS; pass --config.optim.lr=3e-6 for that.
  c.optim.lr = 4e-6
  c.train.epochs = 200                    # main_QCS_raf_db.py --epochs
  c.model.base_drop = 0.0                 # QCS_7cls_raf_db.py VIT_base drop_ratio
  c.model.cross_drop = 0.0                # QCS_7cls_raf_db.py VIT_cross drop_ratio
  c.data.augment = recipe_augment("rafdb")  # main_QCS_raf_db.py data_transforms
  return c
