"""The native small-M float32 kernel (leanlm/native/sgemm.c) and the packed Linear method."""
import pytest
import torch
import torch.nn.functional as F

from leanlm import native
from leanlm.native import gemm

pytestmark = pytest.mark.skipif(gemm.kernel() is None, reason="no C compiler: the torch path is used")


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16, 30, 64])
@pytest.mark.parametrize("N, K", [(16, 64), (40, 17), (96, 1), (200, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_reference(M, N, K, bias):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    y = gemm.linear(x, gemm.pack(w), N, b)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    assert y.shape == (M, N) and y.dtype == torch.float32
    # float32 accumulation over K terms: error bound ~ K * eps * sum |x w|
    bound = 4 * K * 2**-24 * (x.double().abs() @ w.double().abs().T) + 1e-6
    assert ((y.double() - ref).abs() <= bound).all()


def test_rows_do_not_depend_on_the_batch():
    """Batch invariance: a row's output is bit-identical alone and inside any batch, which makes
    speculative verification of k tokens reproduce k single-token steps exactly."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 96, generator=g), torch.randn(72, 96, generator=g)
    p = gemm.pack(w)
    alone = torch.cat([gemm.linear(x[i:i + 1], p, 72) for i in range(40)])
    for M in (2, 5, 7, 9, 13, 16, 40):
        assert torch.equal(gemm.linear(x[:M], p, 72), alone[:M]), M


def test_pack_round_trip_and_leading_dims():
    w = torch.randn(40, 24)
    p = gemm.pack(w)
    assert p.shape == (3, 24, 16) and torch.equal(gemm.unpack(p, 40), w)
    assert (p.transpose(1, 2).reshape(48, 24)[40:] == 0).all()  # padding columns are zero
    x = torch.randn(2, 3, 24)
    torch.testing.assert_close(gemm.linear(x, p, 40), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert gemm.linear(torch.randn(0, 24), p, 40).shape == (0, 40)


def test_compiled_graph_calls_the_kernel():
    w, b = torch.randn(48, 32), torch.randn(48)
    p = gemm.pack(w)
    f = torch.compile(lambda x: torch.relu(gemm.linear(x, p, 48, b)), fullgraph=True)
    x = torch.randn(3, 32)
    assert torch.equal(f(x), torch.relu(gemm.linear(x, p, 48, b)))


def test_packed_linear_layer_keeps_one_copy_and_reads_back(tiny_model_dir):
    from leanlm import LLM
    from leanlm.quant.linear import PackedFloat32Method

    model = LLM(str(tiny_model_dir("qwen2")), dtype="float32").engine.model  # qkv bias
    layer = model.layers[0].self_attn.qkv_proj
    assert isinstance(layer.method, PackedFloat32Method)
    assert "weight" not in dict(layer.named_parameters())  # the panels are the only copy
    w = layer.weight
    x = torch.randn(5, layer.in_features)
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.bias), rtol=1e-5, atol=1e-5)
    layer.set_weight(2 * w)
    torch.testing.assert_close(layer(x), F.linear(x, 2 * w, layer.bias), rtol=1e-5, atol=1e-5)
    # a tied LM head: the embedding keeps its matrix, the head reads the same values back
    tied = LLM(str(tiny_model_dir("llama")), dtype="float32").engine.model
    assert torch.equal(tied.lm_head.weight, tied.embed_tokens.weight)


def test_engine_output_matches_torch_path(tiny_model_dir, monkeypatch):
    from leanlm import LLM, SamplingParams

    path, prompt = str(tiny_model_dir("llama")), [[5, 17, 42, 99, 3, 250], [7, 8, 9]]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=3)
    native_out = LLM(path, dtype="float32").generate(prompt, params)
    monkeypatch.setenv("LEANLM_NATIVE", "0")
    llm = LLM(path, dtype="float32")
    assert llm.engine.model.layers[0].mlp.down_proj.method.name == "none"
    torch_out = llm.generate(prompt, params)
    for a, b in zip(native_out, torch_out):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            for t in lb:
                assert abs(la[t].logprob - lb[t].logprob) < 1e-4


def test_build_failure_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setattr(native, "_loaded", {})
    with caplog.at_level("WARNING", logger="leanlm"):
        assert native.load("sgemm") is None
    assert "sgemm" in caplog.text and "failed" in caplog.text
    with pytest.raises(RuntimeError, match="failed to build"):
        native.build("sgemm")
    monkeypatch.setenv("LEANLM_NATIVE", "0")
    monkeypatch.setattr(native, "_loaded", {})
    assert native.load("sgemm") is None and not native.enabled()


def test_build_is_cached_per_source(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path))
    first = native.build("sgemm")
    assert first.parent == tmp_path / "native" and first.exists()
    mtime = first.stat().st_mtime_ns
    assert native.build("sgemm") == first and first.stat().st_mtime_ns == mtime  # not rebuilt


def test_compiled_engine_keeps_plain_linears(tiny_model_dir):
    """--compile: inductor prepacks F.linear itself (faster there than the opaque native op)."""
    from leanlm import LLM

    model = LLM(str(tiny_model_dir("llama")), dtype="float32", compile=True).engine.model
    assert model.layers[0].mlp.down_proj.method.name == "none" and model.lm_head.method.name == "none"
    assert "weight" in dict(model.layers[0].mlp.down_proj.named_parameters())
