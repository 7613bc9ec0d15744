"""Experiments that test the paper's claims with the package's own training loop."""
