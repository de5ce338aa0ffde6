"""``anofpdm presets``: the named settings (``guided_diffusion/presets.py``), or one preset's values.

    anofpdm presets                                     # every preset, one line each
    anofpdm presets brats-anofpdm-hae_v2_conservative   # its values, per command
"""

from __future__ import annotations

from typing import Optional, Sequence

from guided_diffusion import presets
from guided_diffusion.commands import common
from guided_diffusion.errors import entry_point


def _value(v) -> str:
    return " ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else repr(v) if v == "" else str(v)


def describe(name: str) -> str:
    p = presets.get(name)
    lines = [f"{p.name}: {p.description}", "", "every command:"]
    lines += [f"  --{k} {_value(v)}" for k, v in p.values.items()]
    for command, values in p.by_command.items():
        lines += ["", f"anofpdm {command} only:"] + [f"  --{k} {_value(v)}" for k, v in values.items()]
    return "\n".join(lines)


@entry_point
def main(argv: Optional[Sequence[str]] = None, *, prog: str = "anofpdm presets") -> int:
    p = common.parser(prog, __doc__)
    p.add_argument("name", nargs="?", default="", help="a preset to show (default: list them all)")
    args = p.parse_args(argv)
    if args.name:
        print(describe(args.name))
        return 0
    width = max(len(n) for n in presets.names())
    for name in presets.names():
        preset = presets.get(name)
        print(f"{name:<{width}}  {preset.description}  [{', '.join(preset.by_command)}]")
    return 0
