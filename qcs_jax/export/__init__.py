"""Export of the inference path: a jax.export artefact and an ONNX model, each checked."""
