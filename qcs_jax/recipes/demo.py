"""The embedded demo: QCS with a small network on the synthetic faces (no download).

Minutes on 2 CPU cores. `--config=configs/synthetic.py:dcs` or `:baseline` picks
the other models.
"""
import ml_collections

from qcs_jax.recipes.base import CSA, NUM_CLASSES, base_config


def get_config(model: str = "qcs") -> ml_collections.ConfigDict:
  model = model or "qcs"
  c = base_config()
  c.model.update(name=model, csa=CSA[model], num_classes=NUM_CLASSES["synthetic"],
                 img_size=64, stage_channels=(16, 32, 64), stage_units=(1, 1, 2),
                 embed_dim=64, num_heads=4, base_depth=1, cross_depth=1)
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
