"""The native small-M INT8 kernel (leanlm/native/qgemm.c) and its use by WeightOnlyMethod."""
import pytest
import torch

from leanlm.formats.registry import get_format
from leanlm.models.layers import Linear
from leanlm.native import qgemm
from leanlm.quant.weight_only import WeightOnlyMethod

pytestmark = pytest.mark.skipif(qgemm.kernel() is None, reason="no C compiler: the torch path is used")


def _operands(M, N, K, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scales = torch.rand(N, generator=g) * 0.02 + 1e-3
    return torch.randn(M, K, generator=g), codes, scales, torch.randn(N, generator=g)


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 30])
@pytest.mark.parametrize("N, K", [(16, 64), (40, 17), (96, 1), (200, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64_reference(M, N, K, bias):
    x, codes, scales, b = _operands(M, N, K, M * 1000 + N + K)
    b = b if bias else None
    y = qgemm.linear(x, qgemm.pack(codes), scales, N, b)
    w = codes.double() * scales.double()[:, None]
    ref = x.double() @ w.T + (b.double() if bias else 0)
    assert y.shape == (M, N) and y.dtype == torch.float32
    bound = 4 * (K + 1) * 2**-24 * (x.double().abs() @ w.abs().T) + 1e-6
    assert ((y.double() - ref).abs() <= bound).all()


def test_scales_are_per_output_channel():
    """Negative control: swapping two channels' scales must change exactly those columns."""
    x, codes, scales, _ = _operands(3, 32, 48, 7)
    p = qgemm.pack(codes)
    y = qgemm.linear(x, p, scales, 32)
    swapped = scales.clone()
    swapped[[0, 5]] = scales[[5, 0]]
    y2 = qgemm.linear(x, p, swapped, 32)
    changed = (y2 != y).any(0).nonzero().flatten().tolist()
    assert changed == [0, 5]


def test_rows_do_not_depend_on_the_batch():
    x, codes, scales, b = _operands(40, 72, 96, 1)
    p = qgemm.pack(codes)
    alone = torch.cat([qgemm.linear(x[i:i + 1], p, scales, 72, b) for i in range(40)])
    for M in (2, 5, 7, 9, 13, 16, 40):
        assert torch.equal(qgemm.linear(x[:M], p, scales, 72, b), alone[:M]), M


def _int8_layer(N=40, K=64, bias=True):
    layer = Linear(K, N, bias, torch.float32, WeightOnlyMethod(get_format("int8")))
    torch.manual_seed(0)
    layer.weight.data.normal_()
    if bias:
        layer.bias.data.normal_()
    q = get_format("int8").quantize(layer.weight.data.float(), None)
    layer.method.process_after_loading(layer)
    return layer, q


def test_layer_keeps_one_copy_and_reads_its_codes_back():
    layer, q = _int8_layer()
    assert layer.method.kernel == "int8-native"
    assert set(layer._buffers) == {"int8_panels", "int8_scales"} and "quantized" not in layer.__dict__
    back = layer.quantized  # unpacked from the panels: what checkpoints save
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales)
    x = torch.randn(3, 64)
    ref = x.double() @ (q.codes.double() * q.scales.double()).T + layer.bias.double()
    assert (layer(x).double() - ref).abs().max() < 1e-4


def test_requantizing_replaces_the_native_kernel(monkeypatch):
    """set_quantized again (GPTQ after RTN, another kernel) drops the old panels and metadata."""
    layer, q = _int8_layer()
    monkeypatch.setenv("LEANLM_NATIVE", "0")
    layer.method.set_quantized(layer, q)
    assert layer.method.kernel == "int8" and "int8_panels" not in layer._buffers
    assert "quantized_meta" not in layer.__dict__ and layer.quantized is q
