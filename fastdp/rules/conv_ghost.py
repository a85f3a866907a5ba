"""Ghost norms of convolutions: ||G_i||^2 for G_i = delta_i^T a_i without forming G_i.

With a_t the input patch of output position t and delta_t the output gradient there,

    ||G_i||^2 = sum_{t,s} (a_t . a_s)(delta_t . delta_s).

``unfolded_ghost`` forms the patches (im2col) and both T x T Gram matrices: 2 T^2 (d + p) per example with
d = C_in k^n, p = C_out, plus the unfold's memory traffic. Any stride, dilation and groups.

``shifted_ghost`` (stride 1) never unfolds. A patch is the zero-padded input read at the position plus a kernel
offset, so with a = o * dilation - padding (per spatial dim) and X the Gram matrix of the *unpadded* input
(X[i, j] = x_i . x_j over channels, I x I for I input positions),

    a_t . a_s = sum_o X[t + a_o, s + a_o]          (terms whose index falls in the padding are zero)

    ||G_i||^2 = sum_{t,s} S[t, s] D[t, s],   S = sum_o X shifted by a_o along both axes,   D = delta^T delta.

The sum over offsets factors over the spatial axes (a patch entry is zero as soon as one coordinate falls in the
padding, and the offset of one axis does not depend on another's), so S is summed one axis at a time: k_1 + ... + k_n
box additions (one box of the partial sum += one box of the previous one) instead of k_1 ... k_n. Cost
2 (I^2 C_in + T^2 p) per example and 2k box additions of at most T x T: at 16x16 with 128 channels under 0.45x the
FLOPs of instantiating G_i, and no im2col. With augmult the K views of an example are K blocks of
positions: X and D between two views' positions give the cross terms of the norm of the views' sum.

Where the backend has the ``shifted_gram`` kernel (the compiled extension, CPU and CUDA), S is summed from X in one
launch that keeps each output row in cache, instead of 2k box additions that each pass over the chunk: a chunk then
need not fit in cache, and one chunk usually takes the whole batch (~5 launches per layer instead of ~10 per chunk).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: bytes of Gram matrix formed at a time. On a CPU with the box additions a few examples' worth, so that they run in
#: cache; on a GPU the additions stream from memory anyway and each chunk costs ~k^n + 4 launches, so chunks are large
#: (at 32x32 a Gram matrix is 4 MB: 2 MB chunks would make a batch of 256 cost ~3,000 launches). The shifted_gram
#: kernel keeps its working set in cache whatever the chunk (CHUNK_BYTES_SHIFTED): the cap only bounds the transient
#: memory of X and S on the CPU (measured, 16x16, 128 channels, batch 32: chunks of 8 and 32 examples equally fast)
CHUNK_BYTES = {"cpu": 2 << 20}
CHUNK_BYTES_SHIFTED = {"cpu": 32 << 20}
CHUNK_BYTES_DEFAULT = 256 << 20


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
    return out[0] if len(out) == 1 else torch.cat(out)


def _shift_along(t: torch.Tensor, dim: int, other: int, size_out: int, kernel: int, dilation: int, padding: int):
    """sum_o t shifted by a_o = o * dilation - padding along both ``dim`` and ``other`` (the same spatial axis of the
    Gram matrix's two position indices), the axis going from the input's length to ``size_out``; terms whose index
    falls in the padding are zero."""
    size_in = t.shape[dim]
    boxes = []
    for o in range(kernel):
        a = o * dilation - padding
        lo, hi = max(0, -a), min(size_out, size_in - a)
        if lo < hi:
            boxes.append((lo, hi, a))

    def box(lo: int, hi: int) -> tuple:
        index = [slice(None)] * t.dim()
        index[dim] = index[other] = slice(lo, hi)
        return tuple(index)

    # an offset whose box covers the whole output starts the sum as a copy (one launch instead of zeros + an add)
    full = next((b for b in boxes if b[0] == 0 and b[1] == size_out), None)
    shape = list(t.shape)
    shape[dim] = shape[other] = size_out
    if full is None:
        out = t.new_zeros(shape)
    else:
        boxes.remove(full)
        out = t[box(full[2], full[2] + size_out)].clone(memory_format=torch.contiguous_format)
    for lo, hi, a in boxes:
        out[box(lo, hi)].add_(t[box(lo + a, hi + a)])  # add_ on the view: one launch
    return out


def shifted_ghost(
    x: torch.Tensor,
    d: torch.Tensor,
    kernel,
    dilation,
    padding,
    groups: int,
    augmult: int,
    per_row: bool,
    shifted_gram: Callable | None = None,
) -> torch.Tensor:
    """Ghost norm of a stride-1 convolution from the input's Gram matrix (module docstring).

    x (N, C_in, *S) is the layer input with the convolution's zero ``padding`` still to apply, d (N, C_out, *S_out).
    Returns (B,) per-example squared norms, or (B, C_out) per output row if ``per_row``. ``shifted_gram``: the
    backend's kernel summing the shifts (fastdp.engine.interface.LayerKernels), None for the box additions.
    """
    N, cin = x.shape[:2]
    cout = d.shape[1]
    B, K, g = N // augmult, augmult, groups
    in_shape, out_shape = tuple(x.shape[2:]), tuple(d.shape[2:])
    nd = len(in_shape)

    def per_group_views(t: torch.Tensor, c: int) -> torch.Tensor:
        # (N, c, *S) -> (B * g, c / g, K * |S|): one row per (example, group), the views' positions end to end
        return t.reshape(B, K, g, c // g, -1).permute(0, 2, 3, 1, 4).reshape(B * g, c // g, -1)

    xs, ds = per_group_views(x, cin), per_group_views(d, cout)
    rows = B * g
    chunk = (CHUNK_BYTES if shifted_gram is None else CHUNK_BYTES_SHIFTED).get(x.device.type, CHUNK_BYTES_DEFAULT)
    step = max(1, chunk // (xs.shape[2] ** 2 * xs.element_size()))
    out = []
    for s in range(0, rows, step):
        xc, dc = xs[s : s + step], ds[s : s + step]
        n = xc.shape[0]
        gram = torch.bmm(xc.transpose(1, 2), xc)
        if shifted_gram is not None:
            summed = shifted_gram(gram, in_shape, out_shape, kernel, dilation, padding, K)
        else:
            # the shifts factor over the spatial axes (a patch entry is zero when any coordinate is in the padding):
            # sum over one axis's k offsets, then the next's, k_1 + k_2 box additions instead of k_1 k_2
            summed = gram.view(n, K, *in_shape, K, *in_shape)
            for j in range(nd):
                summed = _shift_along(summed, 2 + j, 3 + nd + j, out_shape[j], kernel[j], dilation[j], padding[j])
            summed = summed.reshape(n, dc.shape[2], dc.shape[2])
        if per_row:
            out.append((torch.bmm(dc, summed) * dc).sum(2))
        else:
            out.append(torch.linalg.vecdot(summed.flatten(1), torch.bmm(dc.transpose(1, 2), dc).flatten(1)))
    sq = out[0] if len(out) == 1 else torch.cat(out)
    if per_row:
        return sq.view(B, cout)
    return sq if g == 1 else sq.view(B, g).sum(1)
