"""XQuant: the latent is X U S of the SVD of [W_k | W_v]; K, V rematerialize within the bound
the latent's quantization step implies (an orthogonal basis maps errors isometrically); keys get
RoPE at their positions; XQuant-CL reconstructs each layer's input within one delta's step
(no accumulation over layers); memory accounting; and the engine end to end."""
import pytest
import torch

from leanlm import LLM
from leanlm.kv.xquant import XQuantCodec, kv_weights
from leanlm.models.layers import RotaryEmbedding
from tests.kv.engine_checks import check_batched_and_prefix_cache, prompts



@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return str(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def model(path):
    return LLM(path, dtype="float32").engine.model


def project(model, layer, x):
    """float64 reference: pre-RoPE k and v [n, Hkv, D] of normed layer input x."""
    c = model.cfg
    kv = x.double() @ kv_weights(model)[layer].T
    return kv[:, : c.kv_size].view(-1, c.num_kv_heads, c.head_dim), kv[:, c.kv_size:].view(-1, c.num_kv_heads, c.head_dim)


def test_latent_is_x_u_sigma(model):
    codec = XQuantCodec(model, 16, 16, torch.float64, "cpu", bits=8, group=16)
    x = torch.randn(10, model.cfg.hidden_size, dtype=torch.float64)
    u, s, _ = torch.linalg.svd(kv_weights(model)[1].T, full_matrices=False)
    k, v = project(model, 1, x)
    latent = torch.cat((k.flatten(1), v.flatten(1)), 1) @ codec.basis[1].T
    torch.testing.assert_close(latent, x @ u * s, rtol=0, atol=1e-10)
    assert codec.bytes_per_token() == model.cfg.num_layers * (2 * model.cfg.kv_size + 4 * 2 * model.cfg.kv_size // 16)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_latent_rematerialization_error_bound(model, bits):
    c = model.cfg
    n = 20
    codec = XQuantCodec(model, 32, 16, torch.float32, "cpu", bits=bits, group=16)
    x = torch.randn(n, c.hidden_size) * 3
    k, v = project(model, 0, x)
    codec.write(0, torch.arange(n), k.float(), v.float())
    kh, vh = codec.read_slots(0, 0, n)
    # reference: RoPE at positions 0..n-1 in float64
    cos, sin = model.rope.tables(torch.arange(n))
    kr = RotaryEmbedding.apply(k, (cos.double(), sin.double()))
    # per token, the latent error is at most s/2 per channel (+ float32 rounding); the basis is
    # orthogonal and RoPE a rotation, so the K,V error's 2-norm is at most the latent error's
    sz = codec.sz[0][:n].double()
    bound = ((sz[..., 0] * 0.5 + 1e-5 * (1 + sz[..., 1].abs())) ** 2 * 16).sum(-1).sqrt()  # [n]
    err = torch.cat(((kh.double() - kr).flatten(1), (vh.double() - v).flatten(1)), 1).norm(dim=1)
    assert (err <= bound * 1.001 + 1e-4).all()
    if bits == 8:  # and it is not vacuous: 8 bits are close
        assert err.max() < 0.05 * torch.cat((k.flatten(1), v.flatten(1)), 1).norm(dim=1).min()


def test_cross_layer_deltas_do_not_accumulate_error(model):
    """x̂_l = x̂_{l-1} + Q(x_l - x̂_{l-1}): each layer's reconstruction is within half its own delta
    step of x_l, however many layers came before."""
    c = model.cfg
    n = 12
    codec = XQuantCodec(model, 16, 16, torch.float32, "cpu", bits=2, group=16, cross_layer=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c.hidden_size, generator=g) * 4
    slots = torch.arange(n)
    for layer in range(c.num_layers):
        x = x + 0.3 * torch.randn(n, c.hidden_size, generator=g)  # the residual stream drifts
        k, v = project(model, layer, x)
        codec.write(layer, slots, k.float(), v.float(), x)
        s = codec.sz[layer][:n, :, 0].double().repeat_interleave(16, 1)
        assert ((codec._prev.double() - x.double()).abs() <= s * 0.5 + 1e-4 * (1 + x.abs())).all()
        kh, vh = codec.read_slots(layer, 0, n)
        # the read rematerializes from the same x̂: K, V of RMSNorm(x̂) with the layer's weights
        h = torch.nn.functional.rms_norm(codec._prev.double(), (c.hidden_size,),
                                         model.layers[layer].input_layernorm.weight.double(), c.rms_norm_eps)
        kr, vr = project(model, layer, h)
        cos, sin = model.rope.tables(torch.arange(n))
        torch.testing.assert_close(vh.double(), vr, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(kh.double(), RotaryEmbedding.apply(kr, (cos.double(), sin.double())),
                                   rtol=1e-4, atol=1e-4)
    assert codec.bytes_per_token() == c.num_layers * (c.hidden_size * 2 // 8 + 4 * c.hidden_size // 16)


@pytest.mark.parametrize("kv", ["xquant:4:g16", "xquant:2:g16:cl"])
def test_memory_accounting_equals_bytes_allocated(model, kv):
    from leanlm.kv.spec import KVSpec, build_codec

    c = model.cfg
    codec = build_codec(KVSpec.parse(kv), c.num_layers, 5, 16, c.num_kv_heads, c.head_dim,
                        torch.float32, "cpu", max_seqs=2, model=model)
    assert codec.allocated_bytes() == 5 * 16 * codec.bytes_per_token() and codec.fixed_bytes() == 0


@pytest.mark.parametrize("kv", ["xquant:8", "xquant:8:cl"])
def test_xquant8_is_close_to_the_plain_cache(path, kv):
    seq = prompts(1, seed=6)[0] * 3
    ref = LLM(path, dtype="float32").score(seq, chunk=5)
    got = LLM(path, dtype="float32", kv=kv).score(seq, chunk=5)
    err = (got - ref).abs().max()
    assert 0 < err < 0.02
    assert (LLM(path, dtype="float32", kv=kv.replace("8", "2")).score(seq, chunk=5) - ref).abs().max() > err


@pytest.mark.parametrize("kv", ["xquant:4", "xquant:3:cl"])
def test_engine_batched_equals_alone_and_prefix_cache(path, kv):
    check_batched_and_prefix_cache(path, kv)


def test_xquant_needs_float_projection_weights(path):
    with pytest.raises(ValueError, match="xquant rematerializes K and V from float k/v projection weights"):
        LLM(path, dtype="float32", kv="xquant:4", quant="rtn:int8")
