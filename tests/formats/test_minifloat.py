"""Minifloat codecs bit-exact against ml_dtypes; absmax-scaled FP8/FP6/FP4 and NF4 weight formats
against float64 references written here.

ml_dtypes does not saturate everywhere: float8_e4m3fn turns overflow into NaN and float8_e5m2 into
inf, while our codecs saturate to ±max. So out-of-range inputs are compared against ml_dtypes'
cast of the input clipped to ±max (which is exactly the saturating conversion). ml_dtypes also maps
NaN to a signed zero in the NaN-less FP6/FP4 types; our documented rule (code 0) is tested directly.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from leanlm.formats.minifloat import (FP4_E2M1, FP6_E2M3, FP6_E3M2, FP8_E4M3, FP8_E5M2, NF4, NF4_CODEBOOK,
                                      FORMAT_NAMES, Minifloat, ScaledMinifloat, make_format)

CODECS = [(FP8_E4M3, ml_dtypes.float8_e4m3fn), (FP8_E5M2, ml_dtypes.float8_e5m2),
          (FP6_E3M2, ml_dtypes.float6_e3m2fn), (FP6_E2M3, ml_dtypes.float6_e2m3fn),
          (FP4_E2M1, ml_dtypes.float4_e2m1fn)]
IDS = [c.name for c, _ in CODECS]


def ml_codes(x: np.ndarray, mdtype) -> np.ndarray:
    return x.astype(mdtype).view(np.uint8)


def ml_values(x: np.ndarray, mdtype) -> np.ndarray:
    return x.astype(mdtype).astype(np.float32)


def assert_same_floats(a, b):
    """Equal values, equal NaN positions, equal signs of zero."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    ok = ~np.isnan(a)
    np.testing.assert_array_equal(a[ok], b[ok])
    assert np.array_equal(np.signbit(a[ok]), np.signbit(b[ok]))


def check_against_ml(codec, mdtype, x: np.ndarray):
    """encode and round_to of x equal ml_dtypes' saturating cast."""
    clipped = np.clip(x, -codec.max_value, codec.max_value)
    t = torch.from_numpy(x)
    np.testing.assert_array_equal(codec.encode(t).numpy(), ml_codes(clipped, mdtype))
    assert_same_floats(codec.round_to(t).numpy(), ml_values(clipped, mdtype))


@pytest.mark.parametrize("codec,mdtype", CODECS, ids=IDS)
def test_every_code_decodes_like_ml_dtypes(codec, mdtype):
    codes = np.arange(2 ** codec.bits, dtype=np.uint8)
    ref = codes.view(mdtype).astype(np.float32)
    assert_same_floats(codec.decode(torch.from_numpy(codes)).numpy(), ref)
    # Every finite code round-trips (NaN codes map to the canonical one, inf saturates to max).
    finite = np.isfinite(ref)
    back = codec.encode(torch.from_numpy(ref[finite])).numpy()
    np.testing.assert_array_equal(back, codes[finite])


@pytest.mark.parametrize("codec,mdtype", CODECS, ids=IDS)
def test_format_constants(codec, mdtype):
    info = ml_dtypes.finfo(mdtype)
    assert codec.max_value == float(info.max)
    assert codec.min_normal == float(info.smallest_normal)
    assert codec.min_subnormal == float(info.smallest_subnormal)
    assert codec.emax == {"e4m3fn": 8, "e5m2": 15, "e3m2": 4, "e2m3": 2, "e2m1": 2}[codec.name]


def test_fp4_value_set():
    assert FP4_E2M1.values().tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert (FP8_E4M3.max_value, FP8_E5M2.max_value, FP6_E3M2.max_value, FP6_E2M3.max_value) == \
        (448.0, 57344.0, 28.0, 7.5)


@pytest.mark.parametrize("codec,mdtype", CODECS, ids=IDS)
def test_ties_round_to_even(codec, mdtype):
    v = codec.values().double().numpy()
    v = np.concatenate([-v[::-1], v])
    mids = ((v[:-1] + v[1:]) / 2).astype(np.float32)      # exact: at most m + 2 significant bits
    assert np.array_equal(mids.astype(np.float64), (v[:-1] + v[1:]) / 2)
    check_against_ml(codec, mdtype, mids)
    # Ties land on the code with an even mantissa, and one float32 ulp either side leaves the tie.
    nonzero_mid = mids[mids != 0]
    assert (codec.encode(torch.from_numpy(nonzero_mid)).numpy() & 1 == 0).all()
    for direction in (np.inf, -np.inf):
        check_against_ml(codec, mdtype, np.nextafter(mids, np.float32(direction)))


def test_fp4_ties_by_hand():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0])
    assert FP4_E2M1.round_to(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -4.0]


@pytest.mark.parametrize("codec,mdtype", CODECS, ids=IDS)
def test_random_values_including_subnormals(codec, mdtype):
    g = np.random.default_rng(0)
    lo, hi = np.log2(codec.min_subnormal) - 3, np.log2(codec.max_value)
    mag = 2.0 ** g.uniform(lo, hi, 20000)
    x = (mag * g.choice([-1.0, 1.0], mag.size)).astype(np.float32)
    assert (np.abs(x) < codec.min_normal).sum() > 100          # the subnormal range is exercised
    check_against_ml(codec, mdtype, x)
    # float64 input is rounded directly (ml_dtypes also converts from float64 without float32).
    x64 = mag * g.choice([-1.0, 1.0], mag.size)
    clipped = np.clip(x64, -codec.max_value, codec.max_value)
    np.testing.assert_array_equal(codec.encode(torch.from_numpy(x64)).numpy(), ml_codes(clipped, mdtype))


@pytest.mark.parametrize("codec,mdtype", CODECS, ids=IDS)
def test_float64_is_not_double_rounded(codec, mdtype):
    # Just above a tie in float64, but a tie once rounded to float32: must round away from the tie.
    v = codec.values().double().numpy()
    mids = (v[:-1] + v[1:]) / 2
    above = mids * (1 + 2.0 ** -40)
    got = codec.round_to(torch.from_numpy(above)).double().numpy()
    np.testing.assert_array_equal(got, v[1:])


@pytest.mark.parametrize("codec,mdtype", CODECS, ids=IDS)
def test_out_of_range_saturates(codec, mdtype):
    m = codec.max_value
    x = np.array([m, m * 1.01, m * 1.2, m * 2, m * 1e3, 3e38, np.inf], dtype=np.float32)
    x = np.concatenate([x, -x])
    check_against_ml(codec, mdtype, x)
    expect = [m] * 7 + [-m] * 7
    assert codec.round_to(torch.from_numpy(x)).tolist() == expect
    assert torch.isfinite(codec.decode(codec.encode(torch.from_numpy(x)))).all()


@pytest.mark.parametrize("codec,mdtype", CODECS, ids=IDS)
def test_negative_zero_and_nan(codec, mdtype):
    sign = 1 << (codec.bits - 1)
    tiny = codec.min_subnormal / 4                  # rounds to zero but keeps its sign
    x = torch.tensor([0.0, -0.0, tiny, -tiny])
    assert codec.encode(x).tolist() == [0, sign, 0, sign]
    assert torch.signbit(codec.round_to(x)).tolist() == [False, True, False, True]
    assert torch.signbit(codec.decode(torch.tensor([sign], dtype=torch.uint8))).item()
    nan = torch.tensor([float("nan"), -float("nan")])
    assert torch.isnan(codec.round_to(nan)).all()
    expected = {"e4m3fn": [0x7F, 0xFF], "e5m2": [0x7E, 0xFE]}.get(codec.name, [0, 0])
    assert codec.encode(nan).tolist() == expected
    if codec.has_nan:                               # same codes as ml_dtypes where the format has NaN
        np.testing.assert_array_equal(ml_codes(nan.numpy(), mdtype), expected)


def test_custom_layouts_and_validation():
    e4m3_ieee = Minifloat(4, 3, has_inf=True, has_nan=True)
    assert e4m3_ieee.max_value == 240.0
    assert Minifloat(3, 2, bias=5).max_value == 7.0            # 2**(7-5) * 1.75
    with pytest.raises(ValueError, match="E5M3"):
        Minifloat(5, 3)
    with pytest.raises(ValueError, match="has_nan"):
        Minifloat(5, 2, has_inf=True)


# ---- weight formats -----------------------------------------------------------------------

def ref_round(x: np.ndarray, mdtype, bits: int) -> np.ndarray:
    """float64 nearest-value rounding, ties to the even code, saturating - by search, not by bits."""
    codes = np.arange(2 ** bits, dtype=np.uint8)
    vals = codes.view(mdtype).astype(np.float64)
    keep = np.isfinite(vals)
    vals, codes = vals[keep], codes[keep]
    x = np.clip(x, vals.min(), vals.max())
    dist = np.abs(x[..., None] - vals)
    best = dist.min(-1, keepdims=True)
    # Among the nearest values pick the one with an even code (its mantissa LSB is 0).
    score = np.where(dist == best, codes % 2, 9)
    return vals[score.argmin(-1)]


@pytest.mark.parametrize("name,codec,mdtype", [(n, c, m) for n, (c, m) in
                                               zip(FORMAT_NAMES, CODECS)], ids=IDS)
def test_scaled_minifloat_matches_float64_reference(name, codec, mdtype):
    torch.manual_seed(0)
    W = torch.randn(16, 128) * torch.logspace(-3, 1, 16)[:, None]
    W[3, :32] = 0                                           # an all-zero group
    fmt = make_format(name)
    q = fmt.quantize(W, group_size=32)
    assert q.format == name and q.codes.dtype == torch.uint8 and q.scales.shape == (16, 4)
    w = W.double().numpy().reshape(-1, 32)
    scale = (np.abs(w).max(1, keepdims=True) / codec.max_value).astype(np.float32).astype(np.float64)
    safe = np.where(scale > 0, scale, 1.0)
    ref = (ref_round(w / safe, mdtype, codec.bits) * scale).astype(np.float32).reshape(16, 128)
    np.testing.assert_array_equal(fmt.dequantize(q).numpy(), ref)
    np.testing.assert_array_equal(q.scales.numpy().reshape(-1, 1), scale.astype(np.float32))
    # Error bound: half a spacing at each value's magnitude, or half a subnormal step.
    err = (fmt.dequantize(q) - W).abs()
    bound = torch.maximum(W.abs() * 2.0 ** -(codec.man_bits + 1),
                          torch.from_numpy(scale.astype(np.float32)).repeat_interleave(32).reshape(16, 128)
                          * codec.min_subnormal / 2)
    assert (err <= bound * (1 + 1e-6)).all()
    assert (fmt.dequantize(q)[3, :32] == 0).all()


def test_scaled_minifloat_maps_absmax_onto_max_and_fake_quant_agrees():
    fmt = make_format("fp8-e4m3")
    W = torch.randn(8, 64)
    q = fmt.quantize(W, group_size=64)
    amax_codes = q.codes[torch.arange(8), W.abs().argmax(1)]
    assert ((amax_codes & 0x7F) == 0x7E).all()              # 448 = S.1111.110
    p = fmt.fit(W, fmt.prepare(W))
    assert torch.equal(fmt.fake_quant(W, p), fmt.dequantize(q))


def test_float16_scales():
    fmt = make_format("fp4-e2m1", scale_dtype=torch.float16)
    W = torch.randn(4, 64)
    W[0] *= 1e-9                                            # would underflow a float16 scale
    q = fmt.quantize(W, group_size=16)
    assert q.stored_scales.dtype == torch.float16
    assert torch.equal(q.stored_scales.float(), q.scales)
    assert (q.scales > 0).all()
    assert fmt.bits_per_weight(16) == 4 + 16 / 16
    with pytest.raises(ValueError, match="scale_dtype"):
        make_format("fp8-e4m3", scale_dtype=torch.int8)


def test_bits_per_weight_and_names():
    assert FORMAT_NAMES == ("fp8-e4m3", "fp8-e5m2", "fp6-e3m2", "fp6-e2m3", "fp4-e2m1", "nf4")
    assert make_format("fp8-e4m3").bits_per_weight(32) == 9.0
    assert make_format("fp6-e2m3").bits_per_weight(64) == 6.5
    assert make_format("nf4").bits_per_weight(64) == 4.5
    assert isinstance(make_format("fp6-e3m2"), ScaledMinifloat)
    with pytest.raises(ValueError, match="fp4-e2m1"):
        make_format("fp5")


# ---- NF4 ----------------------------------------------------------------------------------

QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def test_nf4_codebook_exact():
    assert list(NF4_CODEBOOK) == QLORA_NF4
    fmt = NF4()
    p = fmt.fit(torch.ones(1, 1))
    decoded = fmt.decode(torch.arange(16, dtype=torch.uint8)[None], p)[0]
    assert torch.equal(decoded, torch.tensor(QLORA_NF4, dtype=torch.float32))


def test_nf4_matches_nearest_level_reference():
    torch.manual_seed(1)
    W = torch.randn(32, 128)
    fmt = NF4()
    q = fmt.quantize(W, group_size=64)
    w = W.double().numpy().reshape(-1, 64)
    absmax = np.abs(w).max(1, keepdims=True).astype(np.float32).astype(np.float64)
    cb = np.array(QLORA_NF4, dtype=np.float32).astype(np.float64)
    ref_codes = np.abs(w[..., None] / absmax[..., None] - cb).argmin(-1)   # argmin: ties to the lower code
    np.testing.assert_array_equal(q.codes.numpy().reshape(-1, 64), ref_codes)
    np.testing.assert_array_equal(fmt.dequantize(q).numpy().reshape(-1, 64),
                                  (cb[ref_codes] * absmax).astype(np.float32))
    # Error bound: half the widest gap between levels, times the group's absmax.
    err = (fmt.dequantize(q) - W).abs().reshape(-1, 64)
    assert (err <= torch.from_numpy(absmax).float() * (np.diff(cb).max() / 2) * (1 + 1e-6)).all()


def test_nf4_ties_go_to_lower_code():
    fmt = NF4()
    p = fmt.fit(torch.ones(1, 1))                           # scale 1
    cb = np.array(QLORA_NF4, dtype=np.float32).astype(np.float64)
    mids = (cb[:-1] + cb[1:]) / 2
    exact = mids.astype(np.float32).astype(np.float64) == mids
    assert exact.sum() >= 3                                 # e.g. 0.039790149..., the 0 / 0.0796 midpoint
    x = torch.from_numpy(mids[exact].astype(np.float32))[None]
    assert fmt.encode(x, p)[0].tolist() == np.nonzero(exact)[0].tolist()
    # Float32 neighbours of every midpoint (exact or not) go to the nearer level; on it, to the lower.
    m32 = torch.from_numpy(mids.astype(np.float32))
    for x in (m32, torch.nextafter(m32, torch.tensor(2.0)), torch.nextafter(m32, torch.tensor(-2.0))):
        expected = [i + 1 if x[i].double() > mids[i] else i for i in range(15)]
        assert fmt.encode(x[None], p)[0].tolist() == expected
