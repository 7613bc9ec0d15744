"""A tiny QCS recipe for the multi-process and fault-injection tests (seconds per step on CPU).

Loaded by ``--config=tests/tiny_train_config.py`` (a file path, so no import path is needed).
Augmentation on the device (uint8 batches from an image cache in the temp folder): the
multi-process, kill-and-resume and fault tests run the accelerators' default data path;
tests/test_train.py's resume tests run the host path.
"""
import os
import tempfile

from qcs_jax import recipes as config_lib

CACHE_DIR = os.path.join(tempfile.gettempdir(), "qcs_jax_test_image_cache")


def get_config(model: str = "qcs"):
  c = config_lib.synthetic(model or "qcs")
  c.model.update(img_size=32, stage_channels=(8, 16, 16), stage_units=(1, 1, 1),
                 embed_dim=32, num_heads=2, base_depth=1, cross_depth=1)
  c.data.update(batch_size=8, eval_batch_size=16, workers=0, augment_on="device",
                cache_dir=CACHE_DIR)
  c.data.augment.resize = 32
  c.data.synthetic.update(num_train=48, num_test=20, image_size=32)
  c.train.update(epochs=2, log_every=1, checkpoint_every=2, progress=False)
  c.optim.update(warmup_steps=0, gamma=0.9)
  return c
