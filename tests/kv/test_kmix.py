"""kivi kmix: mixed key bits per channel from a calibration run (leanlm/kv/kmix.py). The greedy
allocation against a brute-force optimum, pack/unpack round trips at mixed widths, the codec's
float64 error bound channel by channel, the native kernel against the torch path, and the
engine end to end (8-bit average keeps greedy outputs, batched == alone)."""
import itertools

import pytest
import torch

from leanlm import LLM
from leanlm.kv import kmix
from leanlm.kv.quantized import KiviCodec
from leanlm.kv.spec import KVSpec, build_codec
from leanlm.models.layers import RotaryEmbedding
from tests.kv.engine_checks import GREEDY, check_batched_and_prefix_cache, ids, prompts

L, H, D, BS, NB = 2, 2, 32, 16, 6
CPU = torch.device("cpu")


def weighted_error(weights, perm, bits):
    w = weights.double()[perm].view(-1, kmix.GROUP).sum(1)
    return float((w / (2.0 ** bits.double() - 1) ** 2).sum())


@pytest.mark.parametrize("avg", [2.0, 2.25, 3.5, 5.0, 8.0])
def test_allocation_spends_the_budget_and_matches_brute_force(avg):
    g = torch.Generator().manual_seed(int(avg * 8))
    w = torch.exp(3 * torch.randn(D, generator=g, dtype=torch.float64))
    perm, bits = kmix.allocate(w, avg)
    assert sorted(perm.tolist()) == list(range(D)) and int(bits.sum()) * 8 == avg * D
    assert bits.tolist() == sorted(bits.tolist(), reverse=True) and bits.min() >= 2 and bits.max() <= 8
    # heavier channels never get fewer bits
    cb = torch.empty(D, dtype=torch.long)
    cb[perm] = bits.repeat_interleave(kmix.GROUP)
    order = torch.argsort(w, descending=True)
    assert (cb[order][:-1] >= cb[order][1:]).all()
    # the greedy optimum equals the best of every split of the budget over the 4 sorted groups
    best = min(weighted_error(w, perm, torch.tensor(b)) for b in itertools.product(range(2, 9), repeat=D // 8)
               if sum(b) * 8 == avg * D and list(b) == sorted(b, reverse=True))
    assert weighted_error(w, perm, bits) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("avg", [2.5, 3.0, 8.0])
def test_pack_round_trip_at_mixed_widths(avg):
    w = torch.exp(torch.randn(H, D, generator=torch.Generator().manual_seed(1)))
    plan = kmix.plan_from_weights([w], avg)
    cb = plan.channel_bits(0)
    codes = (torch.rand(5, 3, H, D) * (2.0 ** cb)).floor().to(torch.uint8)
    packed = kmix.pack(codes, plan.perm[0], plan.bits[0])
    assert packed.shape == (5, 3, H, int(avg * D / 8)) and packed.dtype == torch.uint8
    assert torch.equal(kmix.unpack(packed, plan.perm[0], plan.bits[0]), codes)


def test_bad_budgets_name_the_value():
    with pytest.raises(ValueError, match="average key bits 3.3 must be in"):
        kmix.check_avg_bits(3.3, 64)
    with pytest.raises(ValueError, match="needs prerope and the value bits"):
        KVSpec.parse("kivi:3.5:prerope:kmix")
    with pytest.raises(ValueError, match=r"kmix average key bits '9' must be in \[2, 8\]"):
        KVSpec.parse("kivi:9:v4:prerope:kmix")
    with pytest.raises(ValueError, match="calibrated key-bit plan"):
        build_codec(KVSpec.parse("kivi:3.5:v4:prerope:kmix"), L, NB, BS, H, D, torch.float32, CPU, 2)
    spec = KVSpec.parse("kivi:3.5:g64:v4:c64:s8:prerope:rotate:kmix")
    assert str(spec) == "kivi:3.5:g64:v4:c64:s8:prerope:rotate:kmix" and spec.bits == 3.5 and spec.vbits == 4


def test_codec_error_bound_per_channel_width():
    """Every key channel within half its own step (range / (2^b - 1)) of the pre-RoPE key, and
    bytes_per_token / allocated bytes count the plan's widths."""
    rope = RotaryEmbedding(D, 128, 10000.0, None, torch.float32)
    w = [torch.exp(2 * torch.randn(H, D, generator=torch.Generator().manual_seed(l))) for l in range(L)]
    plan = kmix.plan_from_weights(w, 3.0)
    codec = KiviCodec(L, NB, BS, H, D, torch.float32, CPU, 8, max_partial=2, vbits=4,
                      rope=(rope.cos, rope.sin_signed), key_plan=plan)
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2 * BS, H, D, generator=g) * torch.exp(torch.randn(1, H, D, generator=g))
    for layer in range(L):
        codec.write(layer, torch.arange(2 * BS), k, k)
    for layer in range(L):
        codes = kmix.unpack(codec.kc[layer][:2], plan.perm[layer], plan.bits[layer]).double()
        s, z = codec.ks[layer][:2].double(), codec.kz[layer][:2].double()
        pre = (codes * s + z).view(2 * BS, H, D)
        kb = k.double().view(2, BS, H, D)
        step = ((kb.amax(1) - kb.amin(1)) / (2.0 ** plan.channel_bits(layer).double() - 1)).repeat_interleave(BS, 0)
        err = (pre - k.double()).abs()
        assert (err <= step * (0.5 + 2e-3) + 1e-6).all()
        # a 2-bit channel is coarser than an 8-bit one: the widths are really used
        cb = plan.channel_bits(layer)
        assert err[:, cb == cb.min()].mean() > 4 * err[:, cb == cb.max()].mean()
    assert codec.bytes_per_token() == L * H * (3 * D // 8 + 4 * D // 8 + 4 * D / BS + 4 * D // 32)
    assert codec.allocated_bytes() == NB * BS * codec.bytes_per_token() + codec.fixed_bytes()


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def test_engine_calibrates_and_8_bit_average_keeps_greedy_outputs(path):
    llm = LLM(path, dtype="float32", kv="kivi:8:g16:v8:prerope:kmix", enable_prefix_caching=False)
    plan = llm.engine.cache.codec.key_plan
    assert plan is not None and all((b == 8).all() for b in plan.bits)
    assert ids(llm.generate(prompts(), GREEDY)) == ids(LLM(path, dtype="float32").generate(prompts(), GREEDY))


def test_engine_mixed_widths_batched_equals_alone_and_prefix_cache(path):
    kv = "kivi:3.5:g16:v4:c16:s8:prerope:rotate:kmix"
    plan = LLM(path, dtype="float32", kv=kv).engine.cache.codec.key_plan
    assert any(len(set(b.flatten().tolist())) > 1 for b in plan.bits)  # the calibration spread the bits
    check_batched_and_prefix_cache(path, kv)


def test_missing_calibration_data_is_a_clear_error(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LEANLM_DATA", str(tmp_path))
    with pytest.raises(ValueError, match="kmix calibrates its key bits on ShareGPT prompts.*not found"):
        LLM(path, dtype="float32", kv="kivi:3.5:g16:v4:prerope:kmix")
