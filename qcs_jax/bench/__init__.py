"""Speed of qcs_jax against the PyTorch reference (the CLI is tools/benchmark.py).

workload: model config, batches, weights, step timing; jax_side / torch_side: the
contenders; runner: worker processes taking turns; report: tables and markdown;
parts / profile / roofline: the per-part, per-op and machine-ceiling tools.
"""
