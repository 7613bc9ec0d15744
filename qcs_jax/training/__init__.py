"""The training core: SAM optimiser, losses, metrics, train state/step/loop, plots."""
