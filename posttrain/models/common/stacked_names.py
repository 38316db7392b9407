"""Stacked parameters (MoE experts [E, ...]) against checkpoints that store one tensor per expert.

A family's ``to_hf_name`` returns a template holding ``{e}`` for a stacked parameter
(``layers.3.feed_forward.experts.w1`` -> ``model.layers.3.mlp.experts.{e}.gate_proj.weight``), and its
``from_hf_name`` returns the parameter name with the row in brackets (``...experts.w1[5]``). ``load_hf`` /
``save_hf`` / the sharded loader split and stack rows with these helpers; every other name maps one to one.
"""

from __future__ import annotations

import re

EXPERT_FIELD = "{e}"
_INDEXED = re.compile(r"^(.*)\[(\d+)\]$")


def is_stacked(hf_name: str) -> bool:
    return EXPERT_FIELD in hf_name


def expand_stacked(hf_template: str, n: int) -> list[str]:
    """The per-row checkpoint names of a stacked parameter with ``n`` rows."""
    return [hf_template.replace(EXPERT_FIELD, str(i)) for i in range(n)]


def split_row_index(name: str) -> tuple[str, int | None]:
    """``"a.w1[5]"`` -> ``("a.w1", 5)``; a plain name -> ``(name, None)``."""
    match = _INDEXED.match(name)
    if match is None:
        return name, None
    return match.group(1), int(match.group(2))
