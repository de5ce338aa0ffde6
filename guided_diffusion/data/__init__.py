"""Data: NIfTI preprocessing into slices, slice loaders, synthetic BraTS-like volumes."""
