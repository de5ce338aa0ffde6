"""The networks: one UNet skeleton and its blocks (``unet``), HAE blocks, attention computations."""
