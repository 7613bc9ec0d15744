"""Applications on a trained model: face detection, CSA attention figures, throughput."""
