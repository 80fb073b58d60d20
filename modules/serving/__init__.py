"""Serving: the trained model as one TorchScript file that scores raw IDs (docs/serving.md)."""
