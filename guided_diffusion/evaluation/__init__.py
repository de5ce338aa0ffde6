"""Evaluation: the run that applies a method to val/test slices, metrics and pictures."""
