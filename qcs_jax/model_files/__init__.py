"""Saved models on disk: the model folder (variables/ + model.json), finding one, reading it fast."""
