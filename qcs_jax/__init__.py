"""qcs_jax: QCS / DCS facial expression recognition in JAX/Flax.

`from qcs_jax import Recognizer` (qcs_jax.apps.recognizer) is resolved lazily,
so `import qcs_jax` does not import JAX.
"""
from typing import Any

__all__ = ["Recognizer"]


def __getattr__(name: str) -> Any:
  if name == "Recognizer":
    from qcs_jax.apps.recognizer import Recognizer  # pylint: disable=import-outside-toplevel
    return Recognizer
  raise AttributeError(f"module 'qcs_jax' has no attribute {name!r}")
