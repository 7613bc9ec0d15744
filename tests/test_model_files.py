"""A damaged model folder: one clean error, and nothing printed after it."""
import os
import shutil
import subprocess
import sys

import pytest

from qcs_jax.model_files import weights_cache
from qcs_jax.model_files.locate import CheckpointError

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "qcs_jax",
                    "assets", "demo_model")


@pytest.fixture
def truncated(tmp_path):
  """The embedded demo model with its largest data file cut in half."""
  d = tmp_path / "model"
  shutil.copytree(DEMO, d)
  data = max((p for p in (d / "variables").rglob("*") if p.is_file()), key=os.path.getsize)
  with open(data, "r+b") as f:
    f.truncate(os.path.getsize(data) // 2)
  return d


def test_read_arrays_refuses_a_truncated_file(truncated):
  with pytest.raises(CheckpointError, match="cannot restore .*OUT_OF_RANGE"):
    weights_cache.read_arrays(truncated / "variables")
  assert weights_cache.read_arrays(os.path.join(DEMO, "variables")) is not None  # intact: read


def test_recognizer_load_prints_nothing_after_the_error(truncated):
  code = ("from qcs_jax import Recognizer\nfrom qcs_jax.model_files.locate import CheckpointError\n"
          f"try:\n  Recognizer.load({str(truncated)!r}, cache=False)\n"
          "except CheckpointError as e:\n  print('error:', e)\n")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert p.returncode == 0 and p.stdout.startswith("error: ") and "cannot restore" in p.stdout
  assert "Traceback" not in p.stderr and "Event loop" not in p.stderr, p.stderr[-2000:]
