"""Noise for the diffusion: Gaussian, and AnoDDPM's multi-octave simplex noise, vectorised on torch tensors.

A noise function has the signature ``noise_fn(x, t) -> Tensor`` (shape, dtype and device of ``x``; ``t`` the
``[B]`` timesteps of the rows) and can be passed wherever the diffusion draws noise: ``training_losses``
(``q_sample`` noise and ε target), ``p_sample`` / ``ddim_sample`` (per-step noise) and the sampling loops
(start noise when none is given).

Simplex noise follows upstream AnoFPDM (``scripts/noise.py``, ``scripts/simplex.py``, from AnoDDPM): for every
slice n and channel c a fresh field ``sum_k persistence^k * S(w / f_k, h / f_k, t_n / f_k)`` over ``octaves``
octaves, f_k = frequency / 2^k (64, 32, ..., 2), where S is the original 3-D OpenSimplex noise (K. Spencer's
algorithm, as in the ``opensimplex`` package before 0.4, gradients / normalisation 103 unchanged) with its own
random permutation table. Given the same table this module reproduces upstream's field to float64 rounding
(``tests/reference/upstream/simplex.pt``). Upstream draws the table from an unseeded numpy seed; here it is a
uniform random permutation drawn from torch's RNG (a given ``torch.Generator`` or the global one), so training
resumes and multi-process runs stay exact. The timestep enters only as the z coordinate, as upstream.

Scale: upstream's sum is not normalised: per-field std ≈ 0.48 at 128² (about 0.39-0.60 between fields, lower on
smaller images, whose fields see less of the low octaves), range about ±2. ``scale`` (default 1.0 =
upstream, needed for upstream-trained AnoDDPM checkpoints) multiplies it.

Vectorisation: OpenSimplex sums, over the lattice points within reach, attn^4 · (g · d) with attn = 2 - |d|².
For a point in a cell of the skewed lattice only 10 lattice points can be within reach once the cell's three
internal coordinates are sorted (the lattice and kernel are symmetric under axis permutations), per region
of the cell (internal sum <= 1, in (1, 2), >= 2). Each point therefore visits 10 candidates (one table lookup
per candidate gives its offsets); those out of reach contribute exactly 0, as in the branchy original.
"""

from __future__ import annotations

import itertools
from typing import Callable, Optional, Sequence

import torch

NoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NOISE_TYPES = ("gaussian", "simplex")

# AnoDDPM / upstream AnoFPDM settings
SIMPLEX_OCTAVES, SIMPLEX_PERSISTENCE, SIMPLEX_FREQUENCY = 6, 0.8, 64.0

# OpenSimplex 3-D constants: 24 gradients (rhombicuboctahedron directions), skew factors, normalisation
_GRADIENTS3 = (
    (-11, 4, 4), (-4, 11, 4), (-4, 4, 11), (11, 4, 4), (4, 11, 4), (4, 4, 11),
    (-11, -4, 4), (-4, -11, 4), (-4, -4, 11), (11, -4, 4), (4, -11, 4), (4, -4, 11),
    (-11, 4, -4), (-4, 11, -4), (-4, 4, -11), (11, 4, -4), (4, 11, -4), (4, 4, -11),
    (-11, -4, -4), (-4, -11, -4), (-4, -4, -11), (11, -4, -4), (4, -11, -4), (4, -4, -11),
)
_STRETCH3 = -1.0 / 6.0  # (1 / sqrt(3 + 1) - 1) / 3
_SQUISH3 = 1.0 / 3.0  # (sqrt(3 + 1) - 1) / 3
_NORM3 = 103.0
_PERM_SIZE = 256


def _candidate_table() -> torch.Tensor:
    """Lattice offsets each point visits, ``[39 codes, 10, 3]`` (int64; unused slots hold an out-of-reach offset).

    Codes 0-26 (1 < internal sum < 2): every lattice point within reach is summed, so the 10 offsets that can
    be within reach in sorted internal coordinates u0 >= u1 >= u2 are listed per axis order (code = 9 rank_x
    + 3 rank_y + rank_z). In the two tetrahedra OpenSimplex sums 6 points: the 4 corners and 2 more chosen from
    the closest corners, which leaves out a few points that are within reach (their contributions are tiny but
    not 0), so those 6 are listed as the original picks them, each case keyed by one axis s:
    27+s: sum <= 1, 1 - sum > middle u, s = the largest axis;  30+s: sum <= 1 otherwise, s = the smallest;
    33+s: sum >= 2, 3 - sum < middle u, s = the smallest;      36+s: sum >= 2 otherwise, s = the largest.
    """
    mid_sorted = ((0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, -1), (1, 1, 0),
                  (1, 1, 1), (2, 0, 0))
    unit = torch.eye(3, dtype=torch.long)
    ones, zero = torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    far = torch.full((3,), -2, dtype=torch.long)  # |d|^2 >= 12 from anywhere in the cell: contributes 0
    table = far.repeat(39, 10, 1)
    for ranks in itertools.permutations(range(3)):  # ranks[a] = rank of axis a
        code = ranks[0] * 9 + ranks[1] * 3 + ranks[2]
        table[code] = torch.tensor([[o[ranks[a]] for a in range(3)] for o in mid_sorted])
    low = [zero, unit[0], unit[1], unit[2]]
    high = [ones - unit[0], ones - unit[1], ones - unit[2], ones]
    for s in range(3):
        others = [a for a in range(3) if a != s]
        cases = {
            27: low + [unit[s] - unit[o] for o in others],
            30: low + [ones - 2 * unit[s], ones - unit[s]],
            33: high + [ones - unit[s] + unit[o] for o in others],
            36: high + [unit[s], 2 * unit[s]],
        }
        for base, offsets in cases.items():
            table[base + s, : len(offsets)] = torch.stack(offsets)
    return table


_CANDIDATES = _candidate_table()


def _closest_pair_codes(xi, yi, zi, largest: bool):
    """(axis of the extreme coordinate, the axis left out of the two extreme ones), with OpenSimplex's
    tie-breaking: the two largest (``largest``) or two smallest coordinates are picked x, y first, z replacing
    one of them only when strictly more extreme."""
    def beyond(a, b):  # a strictly more extreme than b
        return a > b if largest else a < b

    xz = ~beyond(yi, xi) & beyond(zi, yi)  # pair (x, z)
    zy = ~xz & beyond(yi, xi) & beyond(zi, xi)  # pair (z, y)
    left_out = torch.where(xz, 1, torch.where(zy, 0, 2))
    extreme = torch.where(xz, torch.where(beyond(zi, xi), 2, 0),
                          torch.where(zy, torch.where(beyond(yi, zi), 1, 2), torch.where(beyond(yi, xi), 1, 0)))
    return extreme, left_out


def opensimplex3(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """3-D OpenSimplex noise at points (x, y, z), one permutation table per field.

    :param x, y, z: float tensors broadcastable to ``[N, ...]`` (field first).
    :param perm: int64 ``[N, 256]``, a permutation of 0..255 per field (the noise's seed).
    :return: ``[N, ...]`` values in about [-0.9, 0.9], in the dtype of the coordinates.
    """
    x, y, z = torch.broadcast_tensors(x, y, z)
    n = perm.shape[0]
    if x.shape[0] != n and x.shape[0] != 1:
        raise ValueError(f"coordinates have {x.shape[0]} fields but perm has {n} tables")
    shape = (n, *x.shape[1:])
    device = x.device
    stretch = (x + y + z) * _STRETCH3
    xs, ys, zs = x + stretch, y + stretch, z + stretch
    xb, yb, zb = xs.floor(), ys.floor(), zs.floor()
    xi, yi, zi = xs - xb, ys - yb, zs - zb  # internal coordinates in [0, 1)
    xb, yb, zb = xb.int(), yb.int(), zb.int()
    in_sum = xi + yi + zi
    middle = in_sum - torch.maximum(torch.maximum(xi, yi), zi) - torch.minimum(torch.minimum(xi, yi), zi)
    # 1 < sum < 2: rank of each axis in descending order of its internal coordinate (ties: lower axis first)
    rx = (yi > xi).int() + (zi > xi).int()
    ry = (xi >= yi).int() + (zi > yi).int()
    rz = (xi >= zi).int() + (yi >= zi).int()
    code = rx * 9 + ry * 3 + rz
    top, not_top = _closest_pair_codes(xi, yi, zi, largest=True)
    bottom, not_bottom = _closest_pair_codes(xi, yi, zi, largest=False)
    code = torch.where(in_sum <= 1, torch.where(1 - in_sum > middle, 27 + top, 30 + not_top), code)
    code = torch.where(in_sum >= 2, torch.where(3 - in_sum < middle, 33 + bottom, 36 + not_bottom), code)
    code = code.int().reshape(-1)

    # flat 1-D tables and int32 indices: index_select is several times faster than advanced indexing on CPU
    def lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return table.index_select(0, index.reshape(-1)).reshape(index.shape)

    perm = perm.to(device=device, dtype=torch.int32)
    grads = torch.tensor(_GRADIENTS3, dtype=x.dtype, device=device)[(perm % len(_GRADIENTS3)).long()]
    perm_flat = perm.reshape(-1)
    gx, gy, gz = (grads[..., i].reshape(-1) for i in range(3))
    table_offset = (torch.arange(n, device=device, dtype=torch.int32) * _PERM_SIZE).reshape(
        n, *([1] * (len(shape) - 1)))
    candidates = _CANDIDATES.to(device=device, dtype=torch.int32)
    value = torch.zeros(shape, dtype=x.dtype, device=device)
    for k in range(candidates.shape[1]):
        ox, oy, oz = (lookup(candidates[:, k, i].contiguous(), code).reshape(x.shape) for i in range(3))
        fx, fy, fz = ox.to(x.dtype), oy.to(x.dtype), oz.to(x.dtype)
        squish = (in_sum - (fx + fy + fz)) * _SQUISH3
        dx, dy, dz = xi - fx + squish, yi - fy + squish, zi - fz + squish
        attn = (2 - dx * dx - dy * dy - dz * dz).clamp_min_(0)
        h = lookup(perm_flat, table_offset + ((xb + ox) & 0xFF))
        h = lookup(perm_flat, table_offset + ((h + yb + oy) & 0xFF))
        h = table_offset + ((h + zb + oz) & 0xFF)
        attn = attn * attn
        value += attn * attn * (lookup(gx, h) * dx + lookup(gy, h) * dy + lookup(gz, h) * dz)
    return value / _NORM3


def fractal_simplex(
    height: int,
    width: int,
    perm: torch.Tensor,
    z: Optional[torch.Tensor] = None,
    *,
    octaves: int = SIMPLEX_OCTAVES,
    persistence: float = SIMPLEX_PERSISTENCE,
    frequency: float = SIMPLEX_FREQUENCY,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Upstream's ``rand_3d_fixed_T_octaves`` for N fields at once: ``[N, height, width]`` on perm's device.

    field[n, h, w] = sum_k persistence^k * opensimplex3(w / f_k, h / f_k, z_n / f_k; perm[n]),
    f_k = frequency / 2^k. ``z`` ([N], default 0) is upstream's T (the timestep of the slice).
    """
    if octaves < 1 or frequency <= 0:
        raise ValueError(f"simplex noise needs octaves >= 1 and frequency > 0, got {octaves}, {frequency}")
    n, device = perm.shape[0], perm.device
    cols = torch.arange(width, device=device, dtype=dtype).reshape(1, 1, width)
    rows = torch.arange(height, device=device, dtype=dtype).reshape(1, height, 1)
    z = torch.zeros(n, device=device, dtype=dtype) if z is None else z.to(device=device, dtype=dtype)
    z = z.reshape(n, 1, 1)
    out = torch.zeros(n, height, width, device=device, dtype=dtype)
    amplitude = 1.0
    for _ in range(octaves):
        out = out + amplitude * opensimplex3(cols / frequency, rows / frequency, z / frequency, perm)
        frequency /= 2
        amplitude *= persistence
    return out


def random_permutations(n: int, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[n, 256]`` independent uniform permutations of 0..255 (one fresh simplex field each)."""
    keys = torch.rand(n, _PERM_SIZE, generator=generator, dtype=torch.float64,
                      device=generator.device if generator is not None else device)
    return keys.argsort(dim=1).to(device)


def simplex_noise_like(
    x: torch.Tensor,
    t: Optional[torch.Tensor] = None,
    *,
    octaves: int = SIMPLEX_OCTAVES,
    persistence: float = SIMPLEX_PERSISTENCE,
    frequency: float = SIMPLEX_FREQUENCY,
    scale: float = 1.0,
    generator: Optional[torch.Generator] = None,
    max_elements: int = 1 << 22,
) -> torch.Tensor:
    """Simplex noise shaped like ``x`` ``[B, C, H, W]``: a fresh field per slice and channel, on x's device.

    ``t`` ([B] timesteps, optional) is the z coordinate of row b's fields, as upstream; the permutation tables
    are drawn from ``generator`` (on its device) or from the global RNG of x's device. Computed in float32
    (float64 for float64 input) in chunks of at most ``max_elements`` pixels, returned in x's dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"simplex noise needs a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    perm = random_permutations(b * c, x.device, generator)
    z = torch.zeros(b, device=x.device) if t is None else torch.as_tensor(t, device=x.device).reshape(-1).float()
    if z.shape[0] != b:
        raise ValueError(f"t has {z.shape[0]} entries for a batch of {b}")
    z = z.repeat_interleave(c)
    chunk = max(1, max_elements // (h * w))
    fields = [
        fractal_simplex(h, w, perm[i: i + chunk], z[i: i + chunk], octaves=octaves, persistence=persistence,
                        frequency=frequency, dtype=dtype)
        for i in range(0, b * c, chunk)
    ]
    out = torch.cat(fields).reshape(b, c, h, w)
    return (out * scale if scale != 1.0 else out).to(x.dtype)


class SimplexNoise:
    """A ``noise_fn(x, t)`` drawing AnoDDPM simplex noise (see module docstring); picklable, stateless apart
    from the optional generator."""

    def __init__(
        self,
        octaves: int = SIMPLEX_OCTAVES,
        persistence: float = SIMPLEX_PERSISTENCE,
        frequency: float = SIMPLEX_FREQUENCY,
        scale: float = 1.0,
        generator: Optional[torch.Generator] = None,
    ):
        self.octaves, self.persistence, self.frequency, self.scale = octaves, persistence, frequency, scale
        self.generator = generator

    def __call__(self, x: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
        return simplex_noise_like(x, t, octaves=self.octaves, persistence=self.persistence,
                                  frequency=self.frequency, scale=self.scale, generator=self.generator)

    def __repr__(self) -> str:
        return (f"SimplexNoise(octaves={self.octaves}, persistence={self.persistence}, "
                f"frequency={self.frequency}, scale={self.scale})")


def gaussian_noise(x: torch.Tensor, t: Optional[torch.Tensor] = None) -> torch.Tensor:
    """N(0, I) like ``x`` (the diffusion's default noise, as a noise_fn)."""
    return torch.randn_like(x)


def make_noise_fn(noise_type: str, **simplex_kwargs) -> NoiseFn:
    """``"gaussian"`` -> gaussian_noise, ``"simplex"`` -> SimplexNoise(**simplex_kwargs); else a ValueError."""
    check_noise_type(noise_type)
    return gaussian_noise if noise_type == "gaussian" else SimplexNoise(**simplex_kwargs)


def check_noise_type(noise_type: str) -> None:
    """A ValueError naming --noise_type unless it is one of NOISE_TYPES."""
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"--noise_type {noise_type!r} is not known; use one of {', '.join(NOISE_TYPES)}")


__all__: Sequence[str] = (
    "NOISE_TYPES", "NoiseFn", "opensimplex3", "fractal_simplex", "random_permutations", "simplex_noise_like",
    "SimplexNoise", "gaussian_noise", "make_noise_fn", "check_noise_type",
)
