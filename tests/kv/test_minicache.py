"""MiniCache: SLERP against a float64 reference; a merged pair reads back each layer's magnitude
along the shared direction; far-apart tokens are retained (layer a exact, layer b within FP8's
bound); memory accounting == bytes allocated; the engine end to end; spec parsing."""
import pytest
import torch

from leanlm.kv.minicache import RETAIN_FRACTION, slerp
from leanlm.kv.spec import KVSpec, build_codec
from tests.kv.engine_checks import check_batched_and_prefix_cache

L, H, D, BS, NB = 6, 2, 16, 16, 4


def codec_for(text):
    return build_codec(KVSpec.parse(text), L, NB, BS, H, D, torch.float32, "cpu", max_seqs=2)


def test_slerp_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, D, generator=g, dtype=torch.float64), torch.randn(50, D, generator=g, dtype=torch.float64)
    ua, ub = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    om = torch.arccos((ua * ub).sum(-1, keepdim=True))
    t = 0.6
    ref = (torch.sin((1 - t) * om) * ua + torch.sin(t * om) * ub) / torch.sin(om)
    e, omega = slerp(ua.float(), ub.float(), t)
    torch.testing.assert_close(e.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(omega.double(), om.squeeze(-1), rtol=0, atol=1e-5)
    same, _ = slerp(ua[:1].float(), ua[:1].float(), t)  # parallel: the direction itself
    torch.testing.assert_close(same, ua[:1].float(), rtol=0, atol=1e-6)


def write_step(codec, n, seed=0, spread=0.05):
    """One step of n tokens through every layer; layer l+1's vectors are layer l's plus noise."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.arange(n)
    k, v = torch.randn(n, H, D, generator=g), torch.randn(n, H, D, generator=g)
    out = []
    for layer in range(L):
        k = k + spread * torch.randn(n, H, D, generator=g)
        v = v + spread * torch.randn(n, H, D, generator=g)
        codec.write(layer, slots, k, v)
        out.append((k.clone(), v.clone()))
    return out


def test_merged_pair_is_shared_direction_times_each_layers_magnitude():
    codec = codec_for("minicache:2:0.6:1+fp32")  # gamma 1: nothing retained
    assert codec.pairs == 2 and codec._where(5) == (3, 1, 1)
    kv = write_step(codec, 20)
    ka, kb = codec.read_slots(2, 0, 20)[0].double(), codec.read_slots(3, 0, 20)[0].double()
    a, b = kv[2][0].double(), kv[3][0].double()
    e, _ = slerp(a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True), 0.6)
    # fp16 magnitudes: relative error <= 2^-11
    torch.testing.assert_close(ka, e * a.norm(dim=-1, keepdim=True), rtol=0, atol=2.0**-11 * a.norm(dim=-1).max() + 1e-6)
    torch.testing.assert_close(kb, e * b.norm(dim=-1, keepdim=True), rtol=0, atol=2.0**-11 * b.norm(dim=-1).max() + 1e-6)
    assert torch.equal(codec.read_slots(1, 0, 20)[0], kv[1][0])  # below START: the inner codec as is
    assert (codec.ret_row[0] == -1).all()


def test_far_apart_tokens_are_retained():
    codec = codec_for("minicache:2:0.6:0.05+fp32")
    kv = write_step(codec, 20, spread=1.0)  # directions far apart: every token wants retention
    quota = round(BS * RETAIN_FRACTION)  # per block: slots 0..15 are block 0, 16..19 block 1
    assert (codec.ret_row[0] >= 0).sum() == 2 * quota and codec.overflow == 2 * (20 - 2 * quota)
    kept = (codec.ret_row[0] >= 0).nonzero().squeeze(1)
    a, b = kv[2], kv[3]
    ka = codec.read_slots(2, 0, 20)[0]
    torch.testing.assert_close(ka[kept], a[0][kept], rtol=2.0**-10, atol=1e-6)  # u_a x |x_a| (fp16 magnitude)
    kb = codec.read_slots(3, 0, 20)[0][kept].double()
    ref = b[0][kept].double()
    # FP8 E4M3 with a power-of-two scale per token and head: half an ulp, 2^-4 relative
    assert ((kb - ref).abs() <= ref.abs() * 2.0**-4 + ref.abs().amax(-1, keepdim=True) * 2.0**-9).all()
    codec.release([0])
    assert (codec.ret_row[0][:BS] == -1).all() and (codec.ret_row[0][BS:20] >= 0).sum() == quota
    assert codec._used[0][:2] == [0, quota]


def test_release_skips_evicted_entries():
    """A table with EVICTED (-1) entries (kv stream) is released whole: -1 names no block, and
    must not reach the pool's last block (here block 1, whose retained tokens stay)."""
    codec = build_codec(KVSpec.parse("minicache:2:0.6:0.05+fp32"), L, 2, BS, H, D, torch.float32, "cpu", max_seqs=2)
    write_step(codec, 20, spread=1.0)
    rows, used = codec.ret_row[0].clone(), list(codec._used[0])
    assert (rows[BS:20] >= 0).any()
    codec.release([-1])
    assert torch.equal(codec.ret_row[0], rows) and codec._used[0] == used
    codec.release([0, -1])
    assert (codec.ret_row[0][:BS] == -1).all() and torch.equal(codec.ret_row[0][BS:], rows[BS:])


@pytest.mark.parametrize("text", ["minicache:2+bf16", "minicache+kivi:4", "minicache:1:0.5:0.1+fp8:e4m3"])
def test_memory_accounting_equals_bytes_allocated(text):
    codec = codec_for(text)
    inner = codec.inner
    assert codec.allocated_bytes() == sum(t.numel() * t.element_size() for t in codec.tensors())
    assert codec.allocated_bytes() == pytest.approx(NB * BS * codec.bytes_per_token() + codec.fixed_bytes())
    # the directions take START + pairs (+ 1 unpaired) virtual layers of the inner codec
    start = codec.start
    assert inner.num_layers == start + (L - start) // 2 + (L - start) % 2
    assert codec.bytes_per_token() < inner.bytes_per_token() / inner.num_layers * L


def test_spec_round_trip_and_errors():
    for text, canonical in [("minicache", "minicache:0.6:0.05+bf16"), ("minicache:12:0.5", "minicache:12:0.5:0.05+bf16"),
                            ("minicache+kivi:4:g64", "minicache:0.6:0.05+kivi:4:g64")]:
        spec = KVSpec.parse(text)
        assert str(spec) == canonical and KVSpec.parse(canonical) == spec
    assert KVSpec.parse("minicache+kivi:4:g64").group == 64
    for bad in ["minicache:x", "minicache:1:2", "minicache:1:0.1:0.1:0.1", "minicache+xquant:4", "minicache+kivi:9"]:
        with pytest.raises(ValueError) as e:
            KVSpec.parse(bad)
        assert "minicache" in str(e.value)
    with pytest.raises(ValueError, match="start layer 9 must be in 0..4"):
        codec_for("minicache:9")


@pytest.mark.parametrize("kv", ["minicache:1", "minicache:0+kivi:4"])
def test_engine_batched_equals_alone_and_prefix_cache(tiny_model_dir, kv):
    check_batched_and_prefix_cache(str(tiny_model_dir("llama")), kv)
