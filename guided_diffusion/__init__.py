"""AnoFPDM and the HAE UNet family, compatible with upstream checkpoints."""

import os as _os

# OpenMP reads its wait policy once, when torch loads it; every entry point imports this package before torch.
# PASSIVE: idle threads sleep instead of spinning, so a step does not collapse when the CPU is shared with other
# work (bench/cpu_threads.py; bench/results/cpu_threads_2026-12-01.md). A value set by the user wins. Thread counts:
# runtime.configure_threads().
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
