"""The whole-layer executor (native/layers.py) on a bfloat16 cache and on KIVI's codes
(kivi_attention.c's kivi_layer_step): the same numbers as the module path, bit for bit, steps
where a block fills (its keys quantized per channel in C) included."""
import pytest
import torch

from leanlm import LLM, SamplingParams
from leanlm.kv.quantized import asym_quantize, asym_quantize8, pack_codes
from leanlm.native import kivi as native_kivi
from leanlm.native import layers as native_layers
from leanlm.native import ops

pytestmark = pytest.mark.skipif(not ops.available() or native_kivi.kernel() is None,
                                reason="no C compiler: the torch path is used")

PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11], [3] * 40, list(range(30, 51))]


def _generate(path, kv, whole_layers: bool, **kw):
    ran = []
    real_run = native_layers.NativeLayers.run

    def counting_run(self, *a):
        out = real_run(self, *a)
        ran.append(out is not None)
        return out

    llm = LLM(path, dtype="float32", kv=kv, **kw)
    llm.engine.model.native = whole_layers
    native_layers.NativeLayers.run = counting_run
    try:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=5))
    finally:
        native_layers.NativeLayers.run = real_run
    return outs, ran


@pytest.mark.parametrize("kv", [
    "bf16", "kivi:4:g16", "kivi:4:g16:s8", "kivi:4:g16:rotate", "kivi:4:g16:v3:c16:s8:rotate", "kivi:3:g16:v4:c16:s8:prerope:rotate",
    "kivi:2:g16:c8:knorm", "kivi:4:g16:r48:sink16:prerope", "kivi:3.5:g16:v4:c16:s8:prerope:rotate:kmix",
    "kivi:8:g16:s8"])
def test_executor_equals_the_module_path_bit_for_bit(tiny_model_dir, kv):
    path = str(tiny_model_dir("llama"))
    extra = {"enable_prefix_caching": False} if "sink" in kv else {}
    fast, ran = _generate(path, kv, True, **extra)
    assert sum(ran) > 20  # the executor ran the decode steps ...
    if "knorm" in kv:
        assert not all(ran)  # ... except those where a knorm block fills (torch computes the norms)
    else:
        assert all(ran)  # ... steps where blocks fill (keys quantized in C) included
    slow, ran_slow = _generate(path, kv, False, **extra)
    assert not ran_slow
    for a, b in zip(fast, slow):
        a, b = a.outputs[0], b.outputs[0]
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert {t: e.logprob for t, e in x.items()} == {t: e.logprob for t, e in y.items()}


@pytest.mark.parametrize("s8", [True, False])
@pytest.mark.parametrize("bits, group", [(2, 16), (3, 32), (4, 64), (8, 32)])
def test_native_value_quantizer_gives_the_torch_codes(s8, bits, group):
    """kivi_quant_values computes asym_quantize8 / asym_quantize's codes, scales and zeros exactly
    (constant groups, tiny magnitudes and large offsets included)."""
    g = torch.Generator().manual_seed(bits * group)
    T, H, D = 37, 3, 64
    x = torch.randn(T, H, D, generator=g) * torch.rand(T, H, 1, generator=g) * 5 + torch.randn(T, H, 1, generator=g)
    x[0, 0] = 0.0
    x[1, 1, :5] = 1e-30
    x[2, 2] += 40.0
    slots = torch.randperm(64, generator=g)[:T]
    ng = D // group
    sdt = (torch.uint8, torch.int8) if s8 else (torch.float16, torch.float16)

    class Codec:
        scale_bits, vgroup, vbits = 8 if s8 else 16, group, bits
        vc = [torch.zeros(64, H, D * bits // 8, dtype=torch.uint8)]
        vs = [torch.zeros(64, H, ng, 1, dtype=sdt[0])]
        vz = [torch.zeros(64, H, ng, 1, dtype=sdt[1])]

    native_kivi.quant_values(Codec, 0, x, slots)
    q, s, z = (asym_quantize8 if s8 else asym_quantize)(x.view(T, H, ng, group), -1, bits)
    assert torch.equal(Codec.vc[0][slots], pack_codes(q.view(T, H, D), bits))
    assert torch.equal(Codec.vs[0][slots], s) and torch.equal(Codec.vz[0][slots], z)
    # negative control: a group's values in another order give other codes
    x[3, 0, :group] = x[3, 0, :group].flip(0)
    native_kivi.quant_values(Codec, 0, x, slots)
    assert not torch.equal(Codec.vc[0][slots], pack_codes(q.view(T, H, D), bits))


def test_native_rotation_is_the_matrix_product():
    from leanlm.quant.rotation import hadamard_matrix

    g = torch.Generator().manual_seed(0)
    R = hadamard_matrix(64, dtype=torch.float32, device="cpu")
    x = torch.randn(5, 3, 64, generator=g)
    got = native_kivi.rotate(x, R)
    assert (got.double() - x.double() @ R.double()).abs().max() < 1e-5
    assert torch.equal(native_kivi.rotate(x[2:3], R), got[2:3])  # rows do not depend on the batch
    # a transposed (non-contiguous) matrix, as the cache passes rot.T to undo the rotation
    Q = torch.linalg.qr(torch.randn(64, 64, generator=g))[0]
    assert (native_kivi.rotate(x, Q.T).double() - x.double() @ Q.T.double()).abs().max() < 1e-5


def test_unfused_rope_rounds_as_torch():
    """The executor rotates q of a prerope cache with rope_unfused_f32: bit for bit torch's."""
    from leanlm.models.layers import RotaryEmbedding

    rope = RotaryEmbedding(64, 512, 10000.0, None, torch.float32)
    pos = torch.tensor([0, 7, 300, 511])
    cos, sin = rope.tables(pos)
    x = torch.randn(4, 9, 64)
    ref = RotaryEmbedding.apply(x, (cos, sin))
    got = x.clone().view(4, 9 * 64)
    ops.rope_unfused_(got, 9, 64, cos.reshape(4, 64).contiguous(), sin.reshape(4, 64).contiguous())
    assert torch.equal(got.view(4, 9, 64), ref)


def test_executor_declines_sizes_the_kernel_refuses():
    """kivi_decode_attention returns -1 past MAXD / MAXG; the module path then reads through
    torch, but the executor could not undo a half-done step, so it must not take such a codec."""
    from leanlm.kv.quantized import KiviCodec

    def codec(head_dim, kv_heads):
        return KiviCodec(1, 2, 16, kv_heads, head_dim, torch.float32, "cpu", bits=4, max_partial=1)

    assert native_kivi.executor_supports(codec(64, 3), 9)
    assert not native_kivi.executor_supports(codec(512, 1), 4)   # head_dim > 256
    assert not native_kivi.executor_supports(codec(64, 1), 32)   # 32 query heads per KV head > 16
