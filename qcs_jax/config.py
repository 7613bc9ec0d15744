"""Recipe configs as code: the paper's training recipes (DATA_AND_TRAINING.md) and the demo.

Each file in configs/ is a one-line ``get_config()`` over ``recipe()`` so every
field can be overridden on the command line (``--config.optim.lr=3e-6``).
"""
from __future__ import annotations

import ml_collections

NUM_BRANCHES = {"baseline": 1, "dcs": 2, "qcs": 4}

# (model, data) -> batch of anchors, lr, epochs, VIT_cross dropout, VIT_base dropout,
# anchor sampling, negative sampling, epoch fraction. From the released scripts.
RECIPES = {
    ("dcs", "rafdb"): (48, 9e-6, 200, 0.2, 0.0, "shuffle", "random", 1.0),
    ("qcs", "rafdb"): (24, 4e-6, 200, 0.0, 0.0, "shuffle", "random", 1.0),
    ("dcs", "ferplus"): (24, 8e-6, 150, 0.2, 0.0, "shuffle", "random", 1.0),
    ("qcs", "ferplus"): (24, 3.5e-6, 150, 0.2, 0.0, "shuffle", "random", 1.0),
    ("dcs", "affectnet7"): (48, 9e-6, 100, 0.4, 0.0, "balanced", "random", 1 / 8),
    ("qcs", "affectnet7"): (24, 4e-6, 150, 0.4, 0.0, "balanced", "balanced", 1 / 12),
    ("dcs", "affectnet8"): (48, 8e-6, 50, 0.5, 0.2, "balanced", "random", 1 / 8),
    ("qcs", "affectnet8"): (24, 4e-6, 100, 0.0, 0.0, "balanced", "balanced", 1 / 12),
}
NUM_CLASSES = {"rafdb": 7, "ferplus": 8, "affectnet7": 7, "affectnet8": 8, "synthetic": 7}
AUGMENT = {"rafdb": "rafdb", "ferplus": "ferplus", "affectnet7": "affectnet",
           "affectnet8": "affectnet", "synthetic": "synthetic"}


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default; recipes change a few."""
  from qcs_jax.data.transforms import recipe_augment

  c = ml_collections.ConfigDict()
  c.model = dict(
      name="qcs", csa="sd", minmax="global", num_classes=7, img_size=224,
      stage_channels=(64, 128, 256), stage_units=(3, 4, 14), embed_dim=768, num_heads=8,
      mlp_ratio=4.0, base_depth=2, cross_depth=1, base_drop=0.0, cross_drop=0.0,
      base_proj_drop=0.0, cross_proj_drop=0.0, dtype="float32",
      remat="none")
  c.data = dict(
      name="rafdb", root="", train_split="train", test_split="test", batch_size=24,
      eval_batch_size=64, workers=2, on_bad_image="error", anchors="shuffle",
      negatives="random", epoch_fraction=1.0, rafdb_variant="aligned", list_train="",
      list_test="", csv="", class_names=(), on_missing="error",
      fer2013_csv="", ferplus_labels="",
      augment=recipe_augment("rafdb"),
      synthetic=dict(num_train=10000, num_test=2000, image_size=112, seed=0,
                     confound=(), label_noise=0.05))
  c.optim = dict(lr=4e-6, rho=0.05, b1=0.9, b2=0.999, eps=1e-8, gamma=0.98, sam=True,
                 warmup_steps=0)
  c.train = dict(epochs=200, seed=0, log_every=50, checkpoint_every=500, keep=2,
                 allow_config_change=False, progress=True, eval_every=1,
                 stop_after_steps=0)
  c.init = dict(backbone="", checkpoint="")
  return c


def recipe(model: str, data: str) -> ml_collections.ConfigDict:
  """The released recipe of ``model`` ('qcs', 'dcs', 'baseline') on ``data``."""
  c = base_config()
  key = (model if model != "baseline" else "dcs", data)
  batch, lr, epochs, cross_drop, base_drop, anchors, negatives, fraction = RECIPES[key]
  eight = NUM_CLASSES[data] == 8  # the 8-class files also drop after attn.proj
  c.model.update(name=model, csa="s" if model == "dcs" else "sd",
                 num_classes=NUM_CLASSES[data], cross_drop=cross_drop, base_drop=base_drop,
                 cross_proj_drop=cross_drop if eight else 0.0,
                 base_proj_drop=base_drop if eight else 0.0)
  from qcs_jax.data.transforms import recipe_augment
  c.data.update(name=data, batch_size=batch, anchors=anchors, negatives=negatives,
                epoch_fraction=fraction, augment=recipe_augment(AUGMENT[data]))
  if data == "ferplus":
    c.data.test_split = "test"
  c.optim.lr = lr
  c.train.epochs = epochs
  return c


def synthetic(model: str = "qcs") -> ml_collections.ConfigDict:
  """The embedded demo: a small network on the synthetic faces, minutes on 2 CPU cores."""
  c = base_config()
  c.model.update(name=model, csa="s" if model == "dcs" else "sd", num_classes=7, img_size=64,
                 stage_channels=(16, 32, 64), stage_units=(1, 1, 2), embed_dim=64,
                 num_heads=4, base_depth=1, cross_depth=1)
  c.data.update(name="synthetic", batch_size=32, eval_batch_size=256, workers=0,
                augment={"resize": 64, "rotate": 0, "crop": False, "hflip": True,
                         "jitter": (0.1, 0.1, 0.1, 0.0), "erase_scale": (),
                         "erase_p": 0.0})
  c.data.synthetic.update(num_train=3000, num_test=1000, image_size=64,
                          confound=(), label_noise=0.05)
  # From scratch, Adam at full rate can stall at ln(7) loss: warm up for ~1 epoch.
  c.optim.update(lr=2e-3, gamma=0.85, warmup_steps=100)
  c.train.update(epochs=8, log_every=20, checkpoint_every=100)
  return c
