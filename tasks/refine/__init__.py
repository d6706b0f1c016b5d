"""Post-processing of calibrated probabilities: the fully connected CRF (DeepLab's)."""
