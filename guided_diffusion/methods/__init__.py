"""Anomaly-segmentation methods: each turns a batch of slices into anomaly maps."""
