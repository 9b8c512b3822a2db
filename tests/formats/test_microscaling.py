"""OCP MX (MXFP8/6/4) and NVFP4 against hand examples and float64 references written here."""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from leanlm.formats.microscaling import (FORMAT_NAMES, MXFormat, NVFP4, e8m0_decode, make_format)

MX = [("mxfp8", ml_dtypes.float8_e4m3fn, 8, 8), ("mxfp8-e5m2", ml_dtypes.float8_e5m2, 8, 15),
      ("mxfp6-e3m2", ml_dtypes.float6_e3m2fn, 6, 4), ("mxfp6-e2m3", ml_dtypes.float6_e2m3fn, 6, 2),
      ("mxfp4", ml_dtypes.float4_e2m1fn, 4, 2)]


def ref_round(x: np.ndarray, mdtype) -> np.ndarray:
    """Saturating round-to-nearest-even into an ml_dtypes element type, from float64."""
    mx = float(ml_dtypes.finfo(mdtype).max)
    return np.clip(x, -mx, mx).astype(mdtype).astype(np.float64)


def block(values, n=32) -> torch.Tensor:
    """One row holding `values` followed by zeros, n wide."""
    row = torch.zeros(1, n)
    row[0, :len(values)] = torch.tensor(values, dtype=torch.float32)
    return row


# ---- MX ----------------------------------------------------------------------------------

@pytest.mark.parametrize("absmax,stored,top", [(6.0, 127, 6.0), (7.0, 127, 6.0), (12.0, 128, 12.0),
                                               (0.75, 124, 0.75), (2.0 ** -130, 0, 0.0)])
def test_mxfp4_scale_exponent_by_hand(absmax, stored, top):
    # shared_exp = floor(log2(absmax)) - 2: 6 and 7 -> 2**0 (7 saturates to 6), 12 -> 2**1,
    # 0.75 -> 2**-3; 2**-130 -> -132 clamped to -127 (byte 0), where the value rounds to 0.
    fmt = make_format("mxfp4")
    q = fmt.quantize(block([absmax, -absmax / 2]))
    assert q.stored_scales.dtype == torch.uint8 and q.stored_scales.item() == stored
    assert q.scales.item() == 2.0 ** (stored - 127)
    w_hat = fmt.dequantize(q)[0]
    assert w_hat[0].item() == top


def test_mxfp8_scale_by_hand():
    fmt = make_format("mxfp8")
    q = fmt.quantize(block([448.0, 1.0, -3.3]))
    assert q.stored_scales.item() == 127                    # floor(log2 448) = 8 = emax
    q = fmt.quantize(block([1.0, 0.1]))
    assert q.stored_scales.item() == 127 - 8
    assert fmt.dequantize(q)[0, 0].item() == 1.0


def test_zero_nan_and_extreme_blocks():
    fmt = make_format("mxfp4")
    W = torch.randn(2, 128)
    W[0, :32] = 0
    W[1, 32:64] = 0
    W[0, 70] = float("nan")
    W[1, 100] = 3e38                                        # shared_exp 125, far from clamping
    q = fmt.quantize(W)
    assert q.stored_scales[0, 0] == 0 and q.stored_scales[1, 1] == 0
    assert (q.codes[0, :32] == 0).all() and (fmt.dequantize(q)[0, :32] == 0).all()
    assert q.stored_scales[0, 2] == 0xFF
    w_hat = fmt.dequantize(q)
    assert torch.isnan(w_hat[0, 64:96]).all() and not torch.isnan(w_hat[0, 96:]).any()
    assert q.stored_scales[1, 3] == 127 + 127 - 2
    assert w_hat[1, 100].item() == 6.0 * 2.0 ** 125
    assert math.isnan(e8m0_decode(torch.tensor([255], dtype=torch.uint8)).item())
    assert e8m0_decode(torch.tensor([0, 127, 254], dtype=torch.uint8)).tolist() == \
        [2.0 ** -127, 1.0, 2.0 ** 127]


@pytest.mark.parametrize("name,mdtype,bits,emax", MX, ids=[m[0] for m in MX])
def test_mx_matches_float64_reference(name, mdtype, bits, emax):
    torch.manual_seed(0)
    # Blocks of very different magnitudes, including ones in the element's subnormal range.
    W = torch.randn(8, 256) * torch.logspace(-6, 4, 64).reshape(8, 8).repeat_interleave(32, 1)
    fmt = make_format(name)
    q = fmt.quantize(W, group_size=32)
    w = W.double().numpy().reshape(-1, 32)
    exps = np.array([math.floor(math.log2(a)) - emax for a in np.abs(w).max(1)])
    scale = 2.0 ** exps[:, None]
    ref = (ref_round(w / scale, mdtype) * scale).astype(np.float32).reshape(8, 256)
    np.testing.assert_array_equal(q.stored_scales.numpy().reshape(-1), exps + 127)
    np.testing.assert_array_equal(fmt.dequantize(q).numpy(), ref)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2 ** bits
    # GPTQ's path (fit one group, fake_quant a column) gives the same values.
    p = fmt.fit(W[:, 64:96], fmt.prepare(W))
    assert torch.equal(fmt.fake_quant(W[:, 64:65], p), fmt.dequantize(q)[:, 64:65])


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_fixed_block_is_enforced(name):
    fmt = make_format(name)
    block_size = 16 if name == "nvfp4" else 32
    assert fmt.fixed_group == block_size
    W = torch.randn(4, 128)
    assert fmt.quantize(W).group_size == block_size         # None means the format's block
    assert fmt.quantize(W, group_size=block_size).scales.shape == (4, 128 // block_size)
    with pytest.raises(ValueError, match=f"blocks of {block_size}"):
        fmt.quantize(W, group_size=64)
    odd = torch.randn(4, 40)  # not whole blocks: zero-padded to whole blocks, cropped on decode
    padded_k = -(-40 // block_size) * block_size
    q = fmt.quantize(odd)
    assert q.codes.shape == (4, padded_k) and fmt.dequantize(q).shape == (4, 40)
    padded = fmt.quantize(torch.nn.functional.pad(odd, (0, padded_k - 40)))
    assert torch.equal(fmt.dequantize(q), fmt.dequantize(padded)[:, :40])


def test_bits_per_weight():
    bpw = {n: make_format(n).bits_per_weight(None) for n in FORMAT_NAMES}
    assert bpw == {"mxfp8": 8.25, "mxfp8-e5m2": 8.25, "mxfp6-e3m2": 6.25, "mxfp6-e2m3": 6.25,
                   "mxfp4": 4.25, "nvfp4": 4.5}
    assert isinstance(make_format("mxfp4"), MXFormat)
    with pytest.raises(ValueError, match="mxfp4"):
        make_format("mxfp3")


# ---- NVFP4 -------------------------------------------------------------------------------

def nvfp4_reference(W: np.ndarray):
    """NVIDIA's recipe in float64 (float32 where the format stores float32)."""
    ts = np.float32(np.abs(W).max() / (448 * 6)).astype(np.float64)
    w = W.reshape(-1, 16)
    bscale = ref_round(np.float32(np.abs(w).max(1, keepdims=True) / 6 / ts).astype(np.float64),
                       ml_dtypes.float8_e4m3fn)
    d = (bscale * ts).astype(np.float32).astype(np.float64)   # the float32 divisor
    safe = np.where(d > 0, d, 1.0)
    elems = np.where(d > 0, ref_round(w / safe, ml_dtypes.float4_e2m1fn), 0.0)
    w_hat = (elems * bscale).astype(np.float32).astype(np.float64) * ts
    return ts, bscale, w_hat.astype(np.float32).reshape(W.shape)


def test_nvfp4_matches_float64_reference():
    torch.manual_seed(0)
    W = torch.randn(16, 256) * 0.02
    W[5, 16:32] = 0
    W[2, 40] = 0.3                                          # the tensor's absmax
    fmt = NVFP4()
    q = fmt.quantize(W)
    ts, bscale, w_hat = nvfp4_reference(W.double().numpy())
    assert q.tensor_scale.dtype == torch.float32 and q.tensor_scale.item() == ts
    assert q.tensor_scale.item() == np.float32(0.3) / np.float32(2688)
    np.testing.assert_array_equal(q.scales.numpy().reshape(-1, 1), bscale.astype(np.float32))
    np.testing.assert_array_equal(q.stored_scales.numpy().reshape(-1, 1),
                                  bscale.astype(np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    np.testing.assert_array_equal(fmt.dequantize(q).numpy(), w_hat)
    assert q.scales[2, 2].item() == 448.0                   # the absmax block uses the top scale
    assert (fmt.dequantize(q)[5, 16:32] == 0).all()


def test_nvfp4_gaussian_error_and_paths():
    torch.manual_seed(2)
    W = torch.randn(64, 512)
    fmt = NVFP4()
    q = fmt.quantize(W)
    W_hat = fmt.dequantize(q)
    rel = ((W_hat - W).norm() / W.norm()).item()
    assert rel < 0.11, rel                                  # E2M1 with a fine scale: ~9% on N(0, 1)
    mx = make_format("mxfp4")
    rel_mx = ((mx.dequantize(mx.quantize(W)) - W).norm() / W.norm()).item()
    assert rel < rel_mx                                     # the finer scale beats power-of-two blocks
    # GPTQ's path: prepare the tensor scale once, fit a group, fake-quantize a column.
    state = fmt.prepare(W)
    p = fmt.fit(W[:, 32:48], state)
    assert torch.equal(fmt.fake_quant(W[:, 40:41], p), W_hat[:, 40:41])
    with pytest.raises(ValueError, match="tensor_scale"):
        fmt.decode(q.codes[:, :16], type(p)(p.scale))
    # An all-zero weight gets tensor scale 1 and decodes to zeros.
    qz = fmt.quantize(torch.zeros(2, 32))
    assert qz.tensor_scale.item() == 1.0 and (fmt.dequantize(qz) == 0).all()
