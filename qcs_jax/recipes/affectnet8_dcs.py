"""DCS on AffectNet-8: main_DCS_affectnet-8.py with models/DCS_8cls_affectnet.py."""
from qcs_jax.recipes import base
from qcs_jax.data.transforms import recipe_augment


def get_config():
  c = base.paper_config("dcs", "affectnet8")
  c.data.batch_size = 48                  # main_DCS_affectnet-8.py --batch-size
  c.optim.lr = 8e-6                       # main_DCS_affectnet-8.py --lr
  c.train.epochs = 50                     # main_DCS_affectnet-8.py --epochs
  # DCS_8cls_affectnet.py drop_ratio: VIT_base 0.2, VIT_cross 0.5; vit_model_8cls.py
  # applies it after attn.proj as well.
  c.model.base_drop = c.model.base_proj_drop = 0.2
  c.model.cross_drop = c.model.cross_proj_drop = 0.5
  # Resize 224, h-flip, erasing (0.02, 0.1) only; test: resize 224, no crop.
  c.data.augment = recipe_augment("affectnet8_dcs")
  c.data.anchors = "balanced"             # imbalanced.py ImbalancedDatasetSampler
  c.data.epoch_fraction = 1 / 8           # imbalanced.py: len(dataset) // 8 per epoch
  return c
