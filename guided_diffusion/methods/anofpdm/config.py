"""The options of AnoFPDM's forward-process loop, the one leaf of the package (the other modules read them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

UGP_MODES = ("null", "upstream")
SUB_ANOMALY_MODES = ("input", "gradient", "gradient_para")


@dataclass
class ForwardConfig:
    """Options of the forward-process loop (translation flags in brackets)."""

    w: float  # guidance weight [--w]
    forward_steps: int  # T [--forward_steps]
    modality: Sequence[int] = (0, 3)  # input channels used for the maps [--modality]
    ddim: bool = True  # DDIM deterministic encoding; False: DDPM q_sample with fresh noise [--d_reverse]
    ugp_mode: str = "null"  # "null": UGP with the null embedding (paper); "upstream": healthy-conditional [--ugp_mode]
    encode_null: bool = True  # DDIM inversion with the null embedding (else healthy-conditional) [--null]
    legacy_ddim_encoding: bool = False  # upstream's off-by-one latent [--legacy_ddim_encoding]
    clip_denoised: bool = True  # clamp x̂0 to [-1, 1]
    sub_anomaly: str = "input"  # S_t: "input" (x̂0_w - x0)²; "gradient"/"gradient_para" ablations
    healthy_label: int = 0
    last_only: bool = False  # [--last_only]
    interval: int = 1  # [--subset_interval]
    include_end: bool = False  # include t_e in the window (paper Eq. 20) [--include_t_e]
    store_maps: bool = False  # keep every S_t on the CPU (needed for --t_e_ratio != 1)

    def validate(self, in_channels: Optional[int] = None) -> None:
        if self.forward_steps < 1:
            raise ValueError(f"--forward_steps must be >= 1, got {self.forward_steps}")
        if self.w < 0:
            raise ValueError(
                f"--w must be >= 0 (the guidance weight; paper: BraTS 2, ATLAS 30), got {self.w}. "
                "Upstream's default -1 silently disabled guidance."
            )
        if self.ugp_mode not in UGP_MODES:
            raise ValueError(f"--ugp_mode must be one of {UGP_MODES}, got {self.ugp_mode!r}")
        if self.sub_anomaly not in SUB_ANOMALY_MODES:
            raise ValueError(f"sub-anomaly mode must be one of {SUB_ANOMALY_MODES}, got {self.sub_anomaly!r}")
        if len(self.modality) == 0 or len(set(self.modality)) != len(self.modality):
            raise ValueError(f"--modality must list distinct channel indices, got {list(self.modality)}")
        if in_channels is not None and any(not 0 <= m < in_channels for m in self.modality):
            raise ValueError(f"--modality {list(self.modality)} out of range for {in_channels} input channels")
        if self.interval < 1:
            raise ValueError(f"--subset_interval must be >= 1 (or -1 for off), got {self.interval}")
