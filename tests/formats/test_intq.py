"""Integer formats against a float64 reference written here: codes, scales, zeros and values
for int2/3/4/8, symmetric and asymmetric, group-wise, per-channel and per-tensor."""
import math

import numpy as np
import pytest
import torch

from leanlm.formats.base import GroupParams
from leanlm.formats.intq import IntFormat
from leanlm.formats.pack import pack, packed_nbytes

# Every positive finite float16, ascending (positive IEEE bit patterns sort like their values).
FP16_TABLE = torch.arange(0, 0x7C00, dtype=torch.int16).view(torch.float16).double()


def ceil_fp16(s: torch.Tensor) -> torch.Tensor:
    """The smallest float16 >= s, by table look-up (independent of the code under test)."""
    return FP16_TABLE[torch.searchsorted(FP16_TABLE, s, side="left")]


def ref_int(w: torch.Tensor, bits: int, symmetric: bool):
    """Reference quantizer in float64 on rows = groups: (codes, scale, zero, w_hat)."""
    w = w.double()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        span = w.abs().amax(1, keepdim=True)
        scale = torch.where(span == 0, 1.0, ceil_fp16(span / qmax))
        q = torch.round(w / scale).clamp(-qmax, qmax)
        return q, scale, None, q * scale
    qmax = 2 ** bits - 1
    lo = w.amin(1, keepdim=True).clamp(max=0)
    hi = w.amax(1, keepdim=True).clamp(min=0)
    scale = torch.where(hi == lo, 1.0, ceil_fp16((hi - lo) / qmax))
    zero = torch.round(-lo / scale)
    q = (torch.round(w / scale) + zero).clamp(0, qmax)
    return q, scale, zero, (q - zero) * scale


def weights(N=16, K=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    w[torch.rand(N, K, generator=g) < 0.01] *= 20           # outliers, as real weights have
    w[1] += 0.3                                              # a skewed row: asymmetric territory
    w[2, :64] = 0.0                                          # zero groups
    w[3, :128] = 0.125                                       # constant groups
    w[4, 64:128] = -7.0
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128, None])
def test_quantize_matches_float64_reference(bits, symmetric, group):
    w = weights()
    fmt = IntFormat(bits, symmetric)
    q = fmt.quantize(w, group)
    g = group or w.shape[1]
    rq, rs, rz, rw = ref_int(w.reshape(-1, g), bits, symmetric)
    assert torch.equal(q.codes.reshape(-1, g).double(), rq)
    assert torch.equal(q.scales.reshape(-1, 1).double(), rs)
    if symmetric:
        assert q.zeros is None and q.codes.dtype == torch.int8
    else:
        assert torch.equal(q.zeros.reshape(-1, 1).double(), rz) and q.codes.dtype == torch.uint8
    w_hat = fmt.dequantize(q)
    assert w_hat.dtype == torch.float32 and torch.isfinite(w_hat).all()
    assert torch.equal(w_hat, rw.reshape(w.shape).float())
    # Inside the range every element is within half a step of its code.
    err = (w.double() - w_hat.double()).reshape(-1, g)
    assert (err.abs() <= rs / 2 * (1 + 1e-9)).all()


@pytest.mark.parametrize("bits, symmetric", [(8, True), (4, False), (3, True), (2, False)])
def test_per_tensor_is_one_group(bits, symmetric):
    w = weights(8, 96, seed=1)
    fmt = IntFormat(bits, symmetric)
    q = fmt.quantize(w, per_tensor=True)
    rq, rs, rz, rw = ref_int(w.reshape(1, -1), bits, symmetric)
    assert q.group_size == 96 and q.scales.shape == (8, 1) and (q.scales == float(rs)).all()
    assert torch.equal(q.codes.reshape(1, -1).double(), rq)
    assert torch.equal(fmt.dequantize(q), rw.reshape(w.shape).float())
    with pytest.raises(ValueError, match="per-tensor"):
        fmt.quantize(w, 32, per_tensor=True)


def test_fit_and_fake_quant_per_column_agree_with_quantize():
    # What GPTQ does: fit at a group's start, then fake-quantize one column at a time.
    w = weights(8, 128, seed=2)
    for fmt in (IntFormat(4), IntFormat(4, True), IntFormat(8)):
        full = fmt.dequantize(fmt.quantize(w, 64))
        for g0 in (0, 64):
            p = fmt.fit(w[:, g0:g0 + 64])
            for j in range(g0, g0 + 64, 7):
                assert torch.equal(fmt.fake_quant(w[:, j:j + 1], p), full[:, j:j + 1])


def test_round_half_to_even_on_exact_ties():
    # Symmetric int4: absmax 7 gives scale 1 exactly, so w / scale are the listed ties.
    w = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]])
    q = IntFormat(4, symmetric=True).quantize(w, 8)
    assert q.scales.item() == 1.0
    assert q.codes.tolist() == [[7, 0, 2, 2, 0, -2, -2, 4]]
    # Asymmetric int4: range [-3, 12] gives scale 1, zero 3; the tie is decided on w / scale,
    # then the zero point is added (as GPTQ does), so 0.5 -> 0 + 3, not round(3.5) = 4.
    w = torch.tensor([[-3.0, 12.0, 0.5, 1.5, 2.5, -0.5, -1.5, 3.5]])
    q = IntFormat(4, symmetric=False).quantize(w, 8)
    assert (q.scales.item(), q.zeros.item()) == (1.0, 3.0)
    assert q.codes.tolist() == [[0, 15, 3, 5, 5, 3, 1, 7]]


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_near_ties_are_decided_exactly(scale_dtype):
    # Weights on and one float32 ulp either side of (k + 1/2) * scale, for many scales: the
    # rounding must follow the exact quotient (a float32 w / scale with a float32 scale, or
    # w * (1 / scale), gets thousands of these wrong).
    g = torch.Generator().manual_seed(5)
    s = (torch.rand(64, 1, generator=g) * 0.02 + 1e-3).to(scale_dtype).float()
    k = torch.randint(-127, 127, (64, 40), generator=g).double()
    tie = ((k + 0.5) * s.double()).float()
    w = torch.cat([tie, torch.nextafter(tie, tie * 2), torch.nextafter(tie, tie * 0)], dim=1)
    codes = IntFormat(8).encode(w, GroupParams(s))
    want = torch.round(w.double() / s.double()).clamp(-127, 127)
    assert torch.equal(codes.double(), want)


@pytest.mark.parametrize("symmetric", [True, False])
def test_degenerate_groups_stay_finite_and_exact(symmetric):
    w = torch.tensor([[0.0] * 8, [2.5] * 8, [-0.75] * 8, [1e-30] * 8, [0.0] * 7 + [3.0]])
    fmt = IntFormat(4, symmetric)
    q = fmt.quantize(w, 8)
    w_hat = fmt.dequantize(q)
    assert torch.isfinite(q.scales).all() and (q.scales > 0).all() and torch.isfinite(w_hat).all()
    assert (w_hat[0] == 0).all() and q.scales[0].item() == 1.0
    assert (w_hat[4, :7] == 0).all()                       # zeros stay exact in both flavours
    assert ((w - w_hat).abs() <= q.scales / 2 * (1 + 1e-9)).all()
    assert (w_hat[1] - 2.5).abs().max() <= 2.5 / 2 ** 10   # a constant is nearly exact


def test_scale_too_large_for_float16_is_a_clear_error():
    with pytest.raises(ValueError, match="float16"):
        IntFormat(8).quantize(torch.full((1, 8), 1e7), 8)
    q = IntFormat(8, scale_dtype=torch.float32).quantize(torch.full((1, 8), 1e7), 8)
    assert torch.isfinite(q.scales).all()


def test_float32_scales_are_rounded_up_to_float32():
    w = weights(8, 128, seed=3)
    q = IntFormat(3, True, scale_dtype=torch.float32).quantize(w, 32)
    span = w.abs().reshape(-1, 32).amax(1).double().numpy() / 3
    want = np.float32(span)
    want = np.where(want.astype(np.float64) < span, np.nextafter(want, np.float32(np.inf)), want)
    want = np.where(span == 0, np.float32(1), want)
    assert np.array_equal(q.scales.reshape(-1).numpy(), want)


def test_names_and_bad_values():
    assert [IntFormat(b).name for b in (8, 4, 3, 2)] == ["int8", "int4", "int3", "int2"]
    assert IntFormat(8).symmetric and not IntFormat(4).symmetric
    assert IntFormat(8, False).name == "int8-asym" and IntFormat(4, True).name == "int4-sym"
    for name in ("int8", "int8-asym", "int4", "int4-sym", "int2", "int3-sym"):
        assert IntFormat.from_name(name).name == name
    assert IntFormat.from_name("int4-asym").name == "int4" and IntFormat.from_name("int8-sym").name == "int8"
    with pytest.raises(ValueError, match="9"):
        IntFormat(9)
    with pytest.raises(ValueError, match="int9"):
        IntFormat.from_name("int9")
    with pytest.raises(ValueError, match="positive integer"):
        IntFormat(4).quantize(torch.zeros(2, 64), 0)


def test_group_that_does_not_divide_k_pads_with_zero_columns():
    """576 features in groups of 128 (SmolLM2): the last group holds 64 real weights; the result
    equals quantizing the zero-padded weight and dropping the padding."""
    w = weights(6, 576, seed=7)
    fmt = IntFormat(4)
    q = fmt.quantize(w, 128)
    assert q.shape == (6, 576) and q.codes.shape == (6, 640) and q.scales.shape == (6, 5)
    padded = fmt.quantize(torch.nn.functional.pad(w, (0, 64)), 128)
    assert torch.equal(q.codes, padded.codes) and torch.equal(q.scales, padded.scales)
    assert torch.equal(fmt.dequantize(q), fmt.dequantize(padded)[:, :576])
    # the short last group is fitted to its 64 real columns alone
    last = fmt.quantize(w[:, 512:], 64)
    assert torch.equal(q.scales[:, 4:], last.scales) and torch.equal(q.codes[:, 512:576], last.codes)


def test_quantized_tensor_shapes():
    w = weights(6, 256)
    q = IntFormat(4).quantize(w, 64)
    assert (q.format, q.shape, q.group_size) == ("int4", (6, 256), 64)
    assert q.codes.shape == (6, 256) and q.scales.shape == (6, 4) and q.zeros.shape == (6, 4)
    q = IntFormat(8).quantize(w)
    assert q.group_size == 256 and q.scales.shape == (6, 1) and q.zeros is None


def test_bits_per_weight_values():
    assert IntFormat(4).bits_per_weight(128) == 4 + (16 + 4) / 128       # fp16 scale + int4 zero
    assert IntFormat(4, True).bits_per_weight(32) == 4.5
    assert IntFormat(8).bits_per_weight(576) == 8 + 16 / 576               # per-channel: pass K
    assert IntFormat(3).bits_per_weight(64) == 3 + 19 / 64
    assert IntFormat(2, scale_dtype=torch.float32).bits_per_weight(32) == 2 + 34 / 32


@pytest.mark.parametrize("bits, symmetric, group", [(3, False, 64), (4, True, 32), (2, False, 32), (8, True, None)])
def test_bits_per_weight_matches_packed_bytes(bits, symmetric, group):
    # Codes, zero points (packed at `bits`) and fp16 scales add up to what bits_per_weight says.
    w = weights(16, 128, seed=4)
    fmt = IntFormat(bits, symmetric)
    q = fmt.quantize(w, group)
    nbytes = pack(q.codes, bits).numel() + q.scales.half().numel() * 2
    if q.zeros is not None:
        zeros = q.zeros.to(torch.uint8)
        assert torch.equal(zeros.float(), q.zeros)
        nbytes += packed_nbytes(zeros.numel(), bits)
    assert nbytes == math.ceil(fmt.bits_per_weight(q.group_size) * w.numel() / 8)
