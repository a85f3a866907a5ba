"""Squared norms of many layers taken together, from small per-row terms of each.

A weight-standardised conv's per-example norm is a short formula over three (B, C_out) per-row terms of its gradient
(fastdp.rules.ws_conv): ~10 launches per layer for a few KB of data, ~150 per step in a WRN-16-4 and ~380 in a
WRN-40-4. The terms of all such layers side by side cost those launches once. Exactness is unaffected: each row's
term is computed from that row's own values exactly as alone, and the total adds the same per-row terms.

A contribution opts in with ``norm_key()`` (fastdp.engine.interface.Contribution) and a static
``sq_norms_together(members)``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fastdp.engine.interface import Contribution


def grouped_sq_norms(contributions: Iterable[Contribution]) -> list[torch.Tensor]:
    """The (B,) squared norms of ``contributions``: one per contribution, or per group of one class and equal
    ``norm_key()`` (their sum)."""
    out, groups = [], {}
    for c in contributions:
        key = c.norm_key()
        if key is None:
            out.append(c.sq_norm())
        else:
            groups.setdefault((type(c), key), []).append(c)
    out += [cls.sq_norms_together(members) for (cls, _), members in groups.items()]
    return out
