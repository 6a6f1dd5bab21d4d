"""Evaluation helpers shared by training, eval, compare and predict: metrics, plots, test-time augmentation."""
