"""GPTQ (Frantar et al., 2022): quantize a weight column by column, feeding each column's
rounding error back into the columns not yet quantized, weighted by the inverse Hessian of the
layer's reconstruction loss ||X W^T - X Q^T||^2 (H = X^T X over calibration tokens).

Follows the reference `fasterquant` of IST-DASLab/gptq:

- dead inputs (H_ii == 0, never active in calibration) get H_ii = 1 and a zero weight column;
- dampening: damp * mean(diag H) is added to the diagonal so H is safely positive definite;
- H^-1 is used through the upper Cholesky factor U of H^-1 (H^-1 = U^T U): row j of U, scaled
  by 1 / U_jj, is exactly the update that column j's error makes to the later columns;
- lazy blocks: updates inside a block of `block_size` columns are applied at once, those to the
  columns after it as one matmul when the block is done (same result, far fewer memory passes).

Groups work with any WeightFormat (see formats/base.py): the first column of each group fits the
group's params on the *current* weights (already corrected by the columns before it), then every
column is encoded with them. With `act_order`, columns are quantized in order of decreasing H_ii
but groups stay the groups of the original column index, with params fitted up front from the
original W ("static groups", as in AutoGPTQ): the codes then keep the plain RTN layout and no
reindexing (g_idx) is needed at inference.

The result is a QuantizedTensor laid out exactly as `fmt.quantize(W, group_size)`.
"""
from __future__ import annotations

import logging

import torch

from leanlm.formats.base import GroupParams, QuantizedTensor, WeightFormat

log = logging.getLogger(__name__)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, fmt: WeightFormat, group_size: int | None,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  dtype: torch.dtype = torch.float32) -> QuantizedTensor:
    """GPTQ-quantize W [N, K] given H = X^T X [K, K]; see the module docstring."""
    return gptq_quantize_with_loss(W, H, fmt, group_size, act_order, damp, block_size, dtype)[0]


def gptq_quantize_with_loss(W: torch.Tensor, H: torch.Tensor, fmt: WeightFormat,
                            group_size: int | None, act_order: bool = False, damp: float = 0.01,
                            block_size: int = 128, dtype: torch.dtype = torch.float32
                            ) -> tuple[QuantizedTensor, float]:
    """As `gptq_quantize`, also returning GPTQ's loss estimate: sum_j ||w_j - q_j||^2 / (2 U_jj^2),
    i.e. half the increase of the (dampened) reconstruction loss."""
    N, K = W.shape
    if H.shape != (K, K):
        raise ValueError(f"H must be [{K}, {K}] for W of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    g = fmt.check_group(K, group_size)
    Kp = -(-K // g) * g                       # whole groups, as fmt.quantize pads
    device = W.device
    state = fmt.prepare(W.float())            # tensor-level state (NVFP4) from the original W

    W = W.to(dtype).clone()
    H = H.to(device=device, dtype=dtype).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if damp > 0:
        H.diagonal().add_(damp * torch.diagonal(H).mean())

    # Padding columns: zero weights, an identity block in H. They are uncoupled from the real
    # columns, quantize to exact zeros and so change nothing but the shapes.
    if Kp != K:
        W = torch.nn.functional.pad(W, (0, Kp - K))
        H = torch.nn.functional.pad(H, (0, Kp - K, 0, Kp - K))
        H.diagonal()[K:] = 1

    if act_order:                             # padding stays last: it never matters when it goes
        perm = torch.cat([torch.argsort(torch.diagonal(H)[:K], descending=True, stable=True),
                          torch.arange(K, Kp, device=device)])
        # Static groups: every group's params from the original (dead-zeroed) W, before any update.
        static = [fmt.fit(W[:, c:c + g], state) for c in range(0, Kp, g)]
        W, H = W[:, perm], H[perm][:, perm]
    else:
        perm, static = None, None

    U = _upper_cholesky_of_inverse(H)
    del H

    params: list[GroupParams | None] = list(static) if static else [None] * (Kp // g)
    codes = None
    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=dtype, device=device)
    for i1 in range(0, Kp, block_size):
        i2 = min(i1 + block_size, Kp)
        W1 = W[:, i1:i2].clone()              # this block's columns, kept current column by column
        Err1 = torch.zeros_like(W1)           # scaled errors (w - q) / U_jj, zero until quantized
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i                        # position in quantization order
            col = j if perm is None else int(perm[j])
            grp = col // g
            if static is None and j % g == 0:
                params[grp] = fmt.fit(_current_group(W, W1, Err1, U, i1, i2, i, g), state)
            p = params[grp]
            # fake_quant split in two so the codes come for free
            c = fmt.encode(W1[:, i:i + 1], p)
            q = fmt.decode(c, p).to(dtype).reshape(N)
            if codes is None:
                codes = torch.zeros((N, Kp), dtype=c.dtype, device=device)
            codes[:, col] = c.reshape(N)
            Q[:, j] = q
            d = U1[i, i]
            err = (W1[:, i] - q) / d
            loss += (err * err).sum() / 2
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]     # the lazy update of everything after the block

    qt = _assemble(fmt, (N, K), g, codes, params, state)
    log.debug("gptq %s g%d act_order=%s: loss %.6g", fmt.name, g, act_order, float(loss))
    return qt, float(loss)


def _upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """U with H^-1 = U^T U, by the reference route: H^-1 = cholesky_inverse(cholesky(H))."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError("GPTQ: H is not positive definite even after dampening; "
                         "use a larger damp or more calibration tokens")
    Hinv = torch.cholesky_inverse(L)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info) != 0:
        raise ValueError("GPTQ: H^-1 is not positive definite (H too ill-conditioned); use a larger damp")
    return U


def _current_group(W, W1, Err1, U, i1, i2, i, g):
    """The weights of the group starting at block column i as they stand now: the in-block part
    is current in W1; the part past the block has not yet received this block's lazy update, so
    apply the share of it owed by the columns already quantized (their Err1 columns; the rest are
    still zero)."""
    j = i1 + i
    inside = W1[:, i:min(i + g, i2 - i1)]
    if j + g <= i2:
        return inside
    after = W[:, i2:j + g] - Err1 @ U[i1:i2, i2:j + g]
    return torch.cat([inside, after], dim=1)


def _assemble(fmt: WeightFormat, shape, g: int, codes: torch.Tensor,
              params: list[GroupParams], state) -> QuantizedTensor:
    """The QuantizedTensor fmt.quantize would build: per-group [N, 1] params side by side."""
    def cat(get):
        parts = [get(p) for p in params]
        return None if parts[0] is None else torch.cat([t.reshape(-1, 1) for t in parts], dim=1)

    scales = cat(lambda p: p.scale.float())
    zeros = cat(lambda p: p.zero)
    stored = cat(lambda p: p.extra.get("stored"))
    return QuantizedTensor(fmt.name, tuple(shape), g, codes, scales, zeros,
                           params[0].extra.get("tensor_scale"), stored)
