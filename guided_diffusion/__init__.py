"""AnoFPDM and the HAE UNet family, compatible with upstream checkpoints."""
