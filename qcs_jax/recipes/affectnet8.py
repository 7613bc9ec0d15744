"""QCS on AffectNet-8: main_QCS_affectnet-8.py with models/QCS_8cls_affectnet.py."""
from qcs_jax.recipes import base
from qcs_jax.data.transforms import recipe_augment


def get_config():
  c = base.paper_config("qcs", "affectnet8")
  c.train.epochs = 100                    # main_QCS_affectnet-8.py --epochs
  c.optim.lr = 4e-6                       # main_QCS_affectnet-8.py --lr
  c.data.batch_size = 24                  # main_QCS_affectnet-8.py --batch-size
  # QCS_8cls_affectnet.py: drop_ratio 0 in both ViTs, so no attn.proj dropout either.
  c.model.base_drop = c.model.cross_drop = 0.0
  c.model.base_proj_drop = c.model.cross_proj_drop = 0.0
  c.data.augment = recipe_augment("affectnet8")  # main_QCS_affectnet-8.py data_transforms
  # imbalanced_q1.py (balanced anchors, len // 12 per epoch) and dataset_q1.py.
  c.data.update(anchors="balanced", epoch_fraction=1 / 12, negatives="balanced")
  return c
