"""DCS on AffectNet-7: main_DCS_affectnet-7.py with models/DCS_7cls_affectnet.py."""
from qcs_jax.recipes import base
from qcs_jax.data.transforms import recipe_augment


def get_config():
  c = base.paper_config("dcs", "affectnet7")
  c.optim.lr = 9e-6                       # main_DCS_affectnet-7.py --lr
  c.train.epochs = 100                    # main_DCS_affectnet-7.py --epochs
  c.data.batch_size = 48                  # main_DCS_affectnet-7.py --batch-size
  c.model.base_drop = 0.0                 # DCS_7cls_affectnet.py VIT_base drop_ratio
  c.model.cross_drop = 0.4                # DCS_7cls_affectnet.py VIT_cross drop_ratio
  c.data.augment = recipe_augment("affectnet")  # main_DCS_affectnet-7.py data_transforms
  # ImbalancedDatasetSampler of imbalanced.py: balanced anchors, len // 8 per epoch.
  c.data.anchors, c.data.epoch_fraction = "balanced", 1 / 8
  return c
