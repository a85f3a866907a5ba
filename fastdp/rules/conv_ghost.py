"""Ghost norms of convolutions: ||G_i||^2 for G_i = delta_i^T a_i without forming G_i.

With a_t the input patch of output position t and delta_t the output gradient there,

    ||G_i||^2 = sum_{t,s} (a_t . a_s)(delta_t . delta_s).

``unfolded_ghost`` forms the patches (im2col) and both T x T Gram matrices: 2 T^2 (d + p) per example with
d = C_in k^n, p = C_out, plus the unfold's memory traffic. Any stride, dilation and groups.

``shifted_ghost`` (stride 1) never unfolds. A patch is the padded input read at the position plus a kernel
offset o, so

    a_t . a_s = sum_o x_{t+o} . x_{s+o}:   the Gram matrix of the *padded input* summed along shifted diagonals.

Lay the output grid into the padded input's grid (row length Wp, top-left corner): position t gets the flat
index u(t) of its patch's first input element, and offset (ky, kx) is the constant flat shift ky*dil*Wp + kx*dil.
Then with delta placed at u(t) (zero at the Wp - W_out extra columns of each row, so wrapped reads meet zero)

    ||G_i||^2 = sum_{u,v} (sum_o X[u+o, v+o]) D[u, v],   X = x_pad^T x_pad (P x P),  D = delta^T delta (L x L),

with P the padded input's positions and L <= P the span of the laid-out output grid. Cost 2 (P^2 C_in + L^2 p)
per example and k^n additions of L x L: at 16x16 with 128 channels 0.65x the FLOPs of instantiating G_i and
no im2col. The K views of an example (augmult) are laid end to end along the flat axis: a view's reads stay
inside its own P positions, and the cross-view blocks of the Gram matrices give the cross terms of the norm of
the views' sum.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

#: Gram matrices are formed for a few examples at a time: the k^n shifted additions then run in cache
_CHUNK_BYTES = 2 << 20


def unfolded_ghost(a: torch.Tensor, d: torch.Tensor, per_row: bool, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Ghost norm from unfolded a (B, d, T) and delta (B, p, T).

    Total: sum_{t,s} (a_t . a_s)(delta_t . delta_s) -> (B,).
    Per output row r (for weight standardisation): sum_{t,s} (a_t . a_s) delta_t[r] delta_s[r] -> (B, p).
    """
    B, _, T = a.shape
    step = max(1, chunk_elems // (T * T))
    out = []
    for s in range(0, B, step):
        ac, dc = a[s : s + step], d[s : s + step]
        ga = torch.bmm(ac.transpose(1, 2), ac)
        if per_row:
            out.append((torch.bmm(dc, ga) * dc).sum(2))
        else:
            out.append((ga * torch.bmm(dc.transpose(1, 2), dc)).sum((1, 2)))
    return torch.cat(out)


class ShiftLayout:
    """Flat layout of one stride-1 convolution call: padded input positions P, laid-out output span L and the
    flat shift of every kernel offset."""

    def __init__(self, in_shape, out_shape, kernel, dilation, padding) -> None:
        self.pad_shape = [s + 2 * p for s, p in zip(in_shape, padding, strict=True)]
        self.out_shape = list(out_shape)
        self.padding = list(padding)
        row = [1] * len(self.pad_shape)  # flat stride of each spatial dim in the padded grid
        for j in range(len(row) - 2, -1, -1):
            row[j] = row[j + 1] * self.pad_shape[j + 1]
        self.P = row[0] * self.pad_shape[0]
        self.L = 1 + sum((o - 1) * r for o, r in zip(self.out_shape, row, strict=True))
        self.offsets = [
            sum(k * dl * r for k, dl, r in zip(ks, dilation, row, strict=True))
            for ks in itertools.product(*(range(k) for k in kernel))
        ]

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, *S) -> (N, C, P): zero-padded, flattened."""
        pad = [q for p in reversed(self.padding) for q in (p, p)]
        return F.pad(x, pad).flatten(2)

    def output(self, d: torch.Tensor) -> torch.Tensor:
        """(N, p, *S_out) -> (N, p, P): delta at its patch's first input position, zero elsewhere."""
        pad = [q for o, s in zip(reversed(self.out_shape), reversed(self.pad_shape), strict=True) for q in (0, s - o)]
        return F.pad(d, pad).flatten(2)


def shifted_ghost(
    x: torch.Tensor,
    d: torch.Tensor,
    kernel,
    dilation,
    padding,
    groups: int,
    augmult: int,
    per_row: bool,
) -> torch.Tensor:
    """Ghost norm of a stride-1 convolution from the padded input's Gram matrix (module docstring).

    x (N, C_in, *S) is the layer input with the convolution's zero ``padding`` still to apply, d (N, C_out, *S_out).
    Returns (B,) per-example squared norms, or (B, C_out) per output row if ``per_row``.
    """
    N, cin = x.shape[:2]
    cout = d.shape[1]
    B, K, g = N // augmult, augmult, groups
    lay = ShiftLayout(x.shape[2:], d.shape[2:], kernel, dilation, padding)
    P = lay.P

    def per_group_views(t: torch.Tensor, c: int) -> torch.Tensor:
        # (N, c, P) -> (B * g, c / g, K * P): one row per (example, group), the views end to end
        return t.view(B, K, g, c // g, P).permute(0, 2, 3, 1, 4).reshape(B * g, c // g, K * P)

    xs = per_group_views(lay.input(x), cin)
    # the last view's laid-out span ends at L; what follows it is zero
    ds = per_group_views(lay.output(d), cout)[:, :, : (K - 1) * P + lay.L]
    span = ds.shape[2]
    rows = B * g
    step = max(1, _CHUNK_BYTES // (xs.shape[2] ** 2 * xs.element_size()))
    out = []
    for s in range(0, rows, step):
        xc, dc = xs[s : s + step], ds[s : s + step]
        gx = torch.bmm(xc.transpose(1, 2), xc)
        o = lay.offsets[0]
        summed = gx[:, o : o + span, o : o + span].clone()
        for o in lay.offsets[1:]:
            summed += gx[:, o : o + span, o : o + span]
        if per_row:
            out.append((torch.bmm(dc, summed) * dc).sum(2))
        else:
            out.append(torch.linalg.vecdot(summed.flatten(1), torch.bmm(dc.transpose(1, 2), dc).flatten(1)))
    sq = torch.cat(out)
    return sq.view(B, cout) if per_row else sq.view(B, g).sum(1)
