"""QCS on AffectNet-7: main_QCS_affectnet-7.py with models/QCS_7cls_affectnet.py."""
from qcs_jax.recipes import base
from qcs_jax.data.transforms import recipe_augment


def get_config():
  c = base.paper_config("qcs", "affectnet7")
  c.data.batch_size = 24                  # main_QCS_affectnet-7.py --batch-size
  c.optim.lr = 4e-6                       # main_QCS_affectnet-7.py --lr
  c.train.epochs = 150                    # main_QCS_affectnet-7.py --epochs (paper: 80)
  c.model.cross_drop = 0.4                # QCS_7cls_affectnet.py VIT_cross drop_ratio
  c.model.base_drop = 0.0                 # QCS_7cls_affectnet.py VIT_base drop_ratio
  c.data.augment = recipe_augment("affectnet")  # main_QCS_affectnet-7.py data_transforms
  # ImbalancedDatasetSampler of imbalanced_q1.py: class-balanced anchors,
  # len(dataset) // 12 per epoch; dataset_q1.py draws the negative's class uniformly.
  c.data.anchors = "balanced"
  c.data.epoch_fraction = 1 / 12
  c.data.negatives = "balanced"
  return c
