"""Ternary (absmean) and block floating point against float64 references written here."""
import math

import pytest
import torch

from leanlm.formats.bfp import BFPFormat, bfp_dequantize, bfp_quantize
from leanlm.formats.pack import pack, pack_trits, packed_nbytes_trits
from leanlm.formats.ternary import TernaryFormat

FP16_TABLE = torch.arange(0, 0x7C00, dtype=torch.int16).view(torch.float16).double()


def ceil_fp16(s):
    return FP16_TABLE[torch.searchsorted(FP16_TABLE, s, side="left")]


def weights(N=8, K=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    w[0, :64] = 0.0
    w[1, :32] = 0.25
    return w


# ---- ternary -------------------------------------------------------------------------------

def ref_ternary(w):
    w = w.double()
    mean = w.abs().mean(1, keepdim=True)
    scale = torch.where(mean == 0, 1.0, ceil_fp16(mean))
    q = torch.round(w / scale).clamp(-1, 1)
    return q, scale, q * scale


@pytest.mark.parametrize("group", [32, 64, 128, None])
def test_ternary_matches_reference(group):
    w = weights()
    fmt = TernaryFormat()
    q = fmt.quantize(w, group)
    g = group or w.shape[1]
    rq, rs, rw = ref_ternary(w.reshape(-1, g))
    assert q.codes.dtype == torch.int8 and set(q.codes.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(q.codes.reshape(-1, g).double(), rq)
    assert torch.equal(q.scales.reshape(-1, 1).double(), rs) and q.zeros is None
    assert torch.equal(fmt.dequantize(q), rw.reshape(w.shape).float())


def test_ternary_per_tensor_ties_and_zero_groups():
    w = weights(4, 64, seed=1)
    q = TernaryFormat().quantize(w, per_tensor=True)
    rq, rs, _ = ref_ternary(w.reshape(1, -1))
    assert (q.scales == float(rs)).all() and torch.equal(q.codes.reshape(1, -1).double(), rq)
    # mean |w| = 1 exactly: 0.5 is a tie that goes to 0 (even), 1.5 rounds to 2 and clamps to 1.
    q = TernaryFormat().quantize(torch.tensor([[0.5, 1.5, 1.0, -1.0], [0.0] * 4]), 4)
    assert q.scales.tolist() == [[1.0], [1.0]] and q.codes.tolist() == [[0, 1, 1, -1], [0, 0, 0, 0]]


def test_ternary_bits_per_weight_and_names():
    assert TernaryFormat().name == "ternary" and TernaryFormat(base3=True).name == "ternary-b3"
    assert TernaryFormat().bits_per_weight(128) == 2 + 16 / 128
    assert TernaryFormat(base3=True).bits_per_weight(64) == 1.6 + 16 / 64
    q = TernaryFormat().quantize(weights(), 64)
    assert pack(q.codes, 2).numel() * 8 == 2 * q.codes.numel()
    assert pack_trits(q.codes).numel() == packed_nbytes_trits(q.codes.numel()) == math.ceil(q.codes.numel() / 5)


# ---- block floating point ------------------------------------------------------------------

def ref_bfp_block(values, m):
    """One block, in Python floats (float64): (exponent, mantissas, step)."""
    amax = max(abs(v) for v in values)
    e = math.floor(math.log2(amax)) if amax > 0 else -127
    e = min(max(e, -127), 127)
    step = math.ldexp(1.0, e - (m - 2))
    qmax = 2 ** (m - 1) - 1
    return e, [min(max(round(v / step), -qmax), qmax) for v in values], step  # round: half to even


def bfp_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 128, generator=g) * torch.logspace(-3, 2, 6).unsqueeze(1)
    x[0, :16] = 0.0                                   # zero block
    x[1, :16] = 1e-39                                 # subnormal block: exponent clamps at -127
    x[2, :16] = torch.linspace(-1, 1, 16) * 3e38      # top of float32: exponent 127
    x[3, :16] = 2.0 ** torch.arange(16)               # exact powers of two
    return x


@pytest.mark.parametrize("m", [2, 4, 6, 8])
@pytest.mark.parametrize("block", [16, 32])
def test_bfp_quantize_matches_reference(m, block):
    x = bfp_data()
    mant, exp = bfp_quantize(x, block, m)
    assert mant.dtype == exp.dtype == torch.int8
    assert mant.shape == x.shape and exp.shape == (6, 128 // block)
    x_hat = bfp_dequantize(mant, exp, block, m)
    for r in range(x.shape[0]):
        for b in range(x.shape[1] // block):
            vals = x[r, b * block:(b + 1) * block].double().tolist()
            e, q, step = ref_bfp_block(vals, m)
            assert exp[r, b].item() == e
            assert mant[r, b * block:(b + 1) * block].tolist() == q
            want = torch.tensor([v * step for v in q], dtype=torch.float64).float()
            assert torch.equal(x_hat[r, b * block:(b + 1) * block], want)
            for v, v_hat in zip(vals, want.tolist()):
                # half a step, or less than a step for the few that saturate near 2^(e+1)
                bound = step / 2 if abs(v) <= (2 ** (m - 1) - 0.5) * step else step
                assert abs(v - v_hat) <= bound


def test_bfp_any_rank_and_dim_equals_last_dim():
    x = torch.randn(2, 64, 3, 5, generator=torch.Generator().manual_seed(3))
    mant, exp = bfp_quantize(x, 16, 8, dim=1)
    assert mant.shape == x.shape and exp.shape == (2, 4, 3, 5)
    m_last, e_last = bfp_quantize(x.movedim(1, -1), 16, 8)
    assert torch.equal(mant, m_last.movedim(-1, 1)) and torch.equal(exp, e_last.movedim(-1, 1))
    assert torch.equal(bfp_dequantize(mant, exp, 16, 8, dim=1),
                       bfp_dequantize(m_last, e_last, 16, 8).movedim(-1, 1))
    with pytest.raises(ValueError, match="24"):
        bfp_quantize(x, 24, 8, dim=1)
    with pytest.raises(ValueError, match="9"):
        bfp_quantize(x, 16, 9)


@pytest.mark.parametrize("m", [4, 8])
def test_bfp_weight_format_equals_functions(m):
    w = bfp_data(1)
    fmt = BFPFormat(m)
    q = fmt.quantize(w, 32)
    mant, exp = bfp_quantize(w, 32, m)
    assert fmt.name == f"bfp{m}" and fmt.bits == m
    assert torch.equal(q.codes, mant) and torch.equal(q.stored_scales, exp)
    assert torch.equal(q.scales, torch.exp2(exp.double() - (m - 2)).float())
    assert torch.equal(fmt.dequantize(q), bfp_dequantize(mant, exp, 32, m))
    assert fmt.bits_per_weight(32) == m + 8 / 32


def test_bfp_small_hand_example():
    # absmax 3 -> e = 1; bfp4: step = 2^(1 - 2) = 0.5, mantissas in [-7, 7].
    mant, exp = bfp_quantize(torch.tensor([3.0, -1.25, 0.25, 3.9]), 4, 4)
    assert exp.tolist() == [1] and mant.tolist() == [6, -2, 0, 7]   # -2.5 -> -2 (even); 7.8 -> 7
