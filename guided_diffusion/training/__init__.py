"""Training: the loop (``train_util``) and its command line (``train_cli``)."""
