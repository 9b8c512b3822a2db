"""Block-diagonal Walsh-Hadamard rotation of a Linear's input space (QuaRot / MR-GPTQ style).

A linear layer computes y = x @ W^T. For any orthogonal Q, y = (x @ Q) @ (W @ Q)^T, so the
rotation can be folded into the weight offline (`rotate_weight`, then quantize W @ Q) and applied
to the activation online (`rotate_activation`). With Q a normalized Hadamard matrix, a weight
(or activation) outlier is spread evenly over the whole block, which shrinks the max/rms ratio
that sets a quantizer's scale, so the other values keep more of their resolution.

Q is block-diagonal, H_b repeated along K, because:
- the transform costs O(K log b) with the butterfly below, not a K x K matmul;
- a block of 16..128 matches the quantization groups (MR-GPTQ rotates per microscaling block);
- K only needs to be a multiple of b, not a power of two (SmolLM2: 576 = 9*64, 1536 = 12*128;
  `pick_block` chooses a block that divides K).

The normalized H_b = H_b^T = H_b^-1 (symmetric and orthonormal), so one function, `fwht`, is the
transform and its inverse, and applying it to the rows of W is exactly W @ H_blockdiag.

    rot = Rotation.for_features(K, 128)       # block 128, or the largest power of two >= 16 dividing K
    W_rot = rot.weight(W)                     # offline, before quantizing
    y = rot.activation(x) @ dequant(W_rot).T  # online, in the QuantMethod's apply
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MIN_BLOCK = 16  # below this a block spreads an outlier too little to be worth a rotation


def is_power_of_two(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """The normalized n x n Sylvester Hadamard matrix, H_2n = [[H, H], [H, -H]] / sqrt(2).

    Dense reference for tests and for building explicit rotation matrices; `fwht` never uses it."""
    if not is_power_of_two(n):
        raise ValueError(f"Hadamard size must be a power of two, got {n!r}")
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(n)


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Fast Walsh-Hadamard transform along the last dim, in independent blocks of `block`.

    Equals x @ blockdiag(H_block, ..., H_block) with the normalized Sylvester H, so it is
    orthonormal and its own inverse. Any leading shape. float32 / float64 are computed in their
    own dtype; float16 / bfloat16 are computed in float32 (log2(block) rounding steps in a half
    type would lose ~log2(block) bits of a 10- or 7-bit mantissa) and cast back. The result has
    x's dtype and shape."""
    if not is_power_of_two(block):
        raise ValueError(f"Hadamard block must be a power of two, got {block!r}")
    if x.dim() == 0 or x.shape[-1] % block:
        size = "a scalar" if x.dim() == 0 else f"last dim {x.shape[-1]}"
        raise ValueError(f"fwht needs the last dim to be a multiple of block {block}; got {size}")
    if not x.is_floating_point():
        raise TypeError(f"fwht needs a floating-point tensor, got {x.dtype}")
    out_dtype = x.dtype
    y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    shape = y.shape
    rows = y.numel() // block
    y = y.reshape(rows, block)
    # butterfly stage h: entries i and i + h of each 2h-chunk become (a + b, a - b); after
    # log2(block) stages this is the Sylvester (natural-order) Hadamard, unnormalized
    h = 1
    while h < block:
        y = y.reshape(rows, block // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(shape) * (1.0 / math.sqrt(block))).to(out_dtype)


def pick_block(K: int, requested: int = 128) -> int:
    """The Hadamard block for K input features: `requested` if it divides K, else the largest
    power of two >= MIN_BLOCK that divides K (necessarily smaller than `requested`), else a
    ValueError. E.g. K=576 (9*64): 128 -> 64; K=1536 (12*128): 128 -> 128."""
    if not is_power_of_two(requested) or requested < MIN_BLOCK:
        raise ValueError(f"requested Hadamard block must be a power of two >= {MIN_BLOCK}, "
                         f"got {requested!r}")
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"number of input features must be a positive integer, got {K!r}")
    if K % requested == 0:
        return requested
    largest = K & -K  # the largest power of two dividing K
    if largest < MIN_BLOCK:
        raise ValueError(f"no Hadamard block >= {MIN_BLOCK} divides K={K} (largest power of two "
                         f"dividing it is {largest}); requested block {requested}")
    return largest


def rotate_weight(w: torch.Tensor, block: int) -> torch.Tensor:
    """W [N, K] -> W @ H_blockdiag (the transform of each row along K); offline, before quantizing."""
    if w.dim() != 2:
        raise ValueError(f"rotate_weight expects a 2-D weight [N, K], got shape {tuple(w.shape)}")
    return fwht(w, block)


def rotate_activation(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., K] -> x @ H_blockdiag; online, so that rotate_activation(x) @ rotate_weight(W).T
    == x @ W.T (H_blockdiag is orthonormal and symmetric)."""
    return fwht(x, block)


@dataclass(frozen=True)
class Rotation:
    """The rotation a QuantMethod applies: fold `weight` into W once, call `activation` on x in
    every `apply` before the matmul with the (quantized) rotated weight."""
    block: int

    def __post_init__(self):
        if not is_power_of_two(self.block):
            raise ValueError(f"Hadamard block must be a power of two, got {self.block!r}")

    @classmethod
    def for_features(cls, K: int, requested: int = 128) -> "Rotation":
        return cls(pick_block(K, requested))

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return rotate_weight(w, self.block)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return rotate_activation(x, self.block)

    def spec_str(self) -> str:
        """Short name for reports and checkpoint specs, e.g. "hadamard:b64"."""
        return f"hadamard:b{self.block}"
