"""Data: readers of the public FER data sets, the synthetic set, sampling, transforms, pipeline."""
