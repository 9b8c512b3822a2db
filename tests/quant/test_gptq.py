"""GPTQ against RTN, against a plain float64 reference, and the Hessian collector."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from leanlm.formats.registry import get_format
from leanlm.quant.calibrate import HessianCollector, collect
from leanlm.quant.gptq import gptq_quantize, gptq_quantize_with_loss


def correlated_inputs(T: int, K: int, seed: int = 0) -> torch.Tensor:
    """X = Z A with a random mixing matrix and uneven channel scales: H = X^T X far from diagonal."""
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(T, K, generator=gen)
    A = torch.randn(K, K, generator=gen) / K ** 0.5 + torch.eye(K)
    return Z @ A * torch.exp(torch.randn(K, generator=gen) * 0.5)


def weight(N: int, K: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed))


def out_err(X, W, fmt, q) -> float:
    return float(torch.linalg.norm(X @ W.T - X @ fmt.dequantize(q).T))


def reference_gptq(W, H, fmt, g, damp, order=None, static=None):
    """Textbook GPTQ in float64: one column at a time, every update applied at once, no blocks.
    `order` (a permutation) and `static` (params per original group) model act-order."""
    N, K = W.shape
    W, H = W.double().clone(), H.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diagonal(H).mean() * torch.eye(K, dtype=H.dtype)
    order = torch.arange(K) if order is None else order
    W, H = W[:, order], H[order][:, order]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    state = fmt.prepare(W.float())
    codes = torch.zeros(N, K, dtype=torch.int64)
    p = None
    for j in range(K):
        col = int(order[j])
        if static is not None:
            p = static[col // g]
        elif j % g == 0:
            p = fmt.fit(W[:, j:j + g], state)
        c = fmt.encode(W[:, j:j + 1], p)
        codes[:, col] = c.reshape(N).long()
        err = (W[:, j] - fmt.decode(c, p).double().reshape(N)) / U[j, j]
        W[:, j:] -= err.unsqueeze(1) * U[j, j:].unsqueeze(0)
    return codes


CASES = [("int4", None), ("int4", 32), ("int3", 32), ("mxfp4", None), ("nvfp4", None)]


@pytest.mark.parametrize("name,g", CASES)
def test_gptq_beats_rtn_on_correlated_inputs(name, g):
    X, W = correlated_inputs(1024, 128), weight(64, 128)
    fmt = get_format(name)
    rtn = fmt.quantize(W, g)
    q, loss = gptq_quantize_with_loss(W, X.T @ X, fmt, g)
    assert q.codes.shape == rtn.codes.shape and q.codes.dtype == rtn.codes.dtype
    assert q.scales.shape == rtn.scales.shape and q.group_size == rtn.group_size
    assert loss > 0
    assert out_err(X, W, fmt, q) < 0.9 * out_err(X, W, fmt, rtn)


@pytest.mark.parametrize("name,g", CASES + [("int4-sym", 16), ("int8", None)])
def test_identity_hessian_is_rtn(name, g):
    # H = I: the inverse's Cholesky factor is I, so no error feeds forward and GPTQ is RTN.
    W, fmt = weight(16, 64), get_format(name)
    q = gptq_quantize(W, torch.eye(64), fmt, g, damp=0.0, block_size=24)
    rtn = fmt.quantize(W, g)
    assert torch.equal(q.codes, rtn.codes) and torch.equal(q.scales, rtn.scales)
    for a in ("zeros", "stored_scales", "tensor_scale"):
        x, y = getattr(q, a), getattr(rtn, a)
        assert (x is None and y is None) or torch.equal(x, y), a


@pytest.mark.parametrize("g,block", [(16, 24), (16, 5), (None, 16), (16, 128)])
def test_blocked_matches_float64_reference(g, block):
    X, W = correlated_inputs(256, 64, seed=3), weight(8, 64, seed=4)
    H, fmt = X.T @ X, get_format("int4")
    ref = reference_gptq(W, H, fmt, g or 64, 0.01)
    q64 = gptq_quantize(W, H, fmt, g, block_size=block, dtype=torch.float64)
    assert torch.equal(q64.codes.long(), ref)
    q32 = gptq_quantize(W, H, fmt, g, block_size=block)
    diff = (q32.codes.long() - ref).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01


@pytest.mark.parametrize("name", ["int4", "nvfp4"])
def test_act_order_static_groups(name):
    N, K, g = 32, 96, 32 if name == "int4" else None
    X, W = correlated_inputs(512, K, seed=5), weight(N, K, seed=6)
    H, fmt = X.T @ X, get_format(name)
    rtn = fmt.quantize(W, g)
    q = gptq_quantize(W, H, fmt, g, act_order=True, block_size=40, dtype=torch.float64)
    # static groups are fitted on the original W, so params (and layout) are RTN's
    assert q.codes.shape == rtn.codes.shape and torch.equal(q.scales, rtn.scales)
    assert fmt.dequantize(q).shape == (N, K)
    assert out_err(X, W, fmt, q) < 0.9 * out_err(X, W, fmt, rtn)
    # the codes sit at their original columns: the reference run in permuted order agrees
    gs = q.group_size
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
    state = fmt.prepare(W)
    static = [fmt.fit(W[:, c:c + gs].double(), state) for c in range(0, K, gs)]
    assert torch.equal(q.codes.long(), reference_gptq(W, H, fmt, gs, 0.01, order, static))


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns(act_order):
    X, W = correlated_inputs(256, 64, seed=7), weight(16, 64)
    dead = [0, 5, 33, 63]
    X[:, dead] = 0
    fmt = get_format("int4")
    q = gptq_quantize(W, X.T @ X, fmt, 16, act_order=act_order, block_size=24)
    W_hat = fmt.dequantize(q)
    assert torch.isfinite(W_hat).all() and torch.isfinite(q.scales).all()
    assert (W_hat[:, dead] == 0).all()     # never seen by calibration: dropped, as in the reference
    rtn = fmt.quantize(W, 16)
    assert out_err(X, W, fmt, q) < out_err(X, W, fmt, rtn)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("g", [32, None])
def test_k_not_multiple_of_group(g, act_order):
    X, W = correlated_inputs(512, 72, seed=8), weight(16, 72, seed=9)
    fmt = get_format("int4")
    rtn = fmt.quantize(W, g)
    q = gptq_quantize(W, X.T @ X, fmt, g, act_order=act_order, block_size=40)
    assert q.shape == (16, 72) and q.codes.shape == rtn.codes.shape and q.scales.shape == rtn.scales.shape
    assert fmt.dequantize(q).shape == (16, 72)
    assert out_err(X, W, fmt, q) < 0.9 * out_err(X, W, fmt, rtn)


def test_installs_on_a_linear():
    from leanlm.quant.weight_only import WeightOnlyMethod

    X, W = correlated_inputs(128, 64), weight(32, 64)
    fmt = get_format("mxfp4")
    q = gptq_quantize(W, X.T @ X, fmt, None)
    layer = nn.Linear(64, 32, bias=False)
    method = WeightOnlyMethod(fmt, None)
    method.set_quantized(layer, q)
    torch.testing.assert_close(method.apply(layer, X), X @ fmt.dequantize(q).T)


def test_hessian_collector_matches_direct():
    torch.manual_seed(0)
    block = nn.ModuleDict({"up": nn.Linear(16, 24), "down": nn.Linear(24, 8)})
    xs = [torch.randn(2, 5, 16), torch.randn(3, 16)]

    def run():
        for x in xs:
            block["down"](torch.relu(block["up"](x)))

    stats = collect(block, ["up", "down"], run)
    X = torch.cat([x.reshape(-1, 16) for x in xs])
    Y = torch.relu(block["up"](X)).detach()
    torch.testing.assert_close(stats["up"][0], X.T @ X)
    torch.testing.assert_close(stats["down"][0], Y.T @ Y)
    assert stats["up"][1] == stats["down"][1] == 13
    # hooks are gone afterwards
    with torch.no_grad():
        run()
    hc = HessianCollector({"up": block["up"]})
    with pytest.raises(KeyError):
        hc.hessian("up")
    assert not block["up"]._forward_pre_hooks


def test_first_token_weight_counts_each_inputs_first_token_that_many_times():
    """The attention-sink weighting: the first token of every input (one calibration sequence
    per call) enters H w times, against a float64 reference; other modules are unweighted."""
    torch.manual_seed(0)
    block = nn.ModuleDict({"qkv": nn.Linear(12, 6), "o": nn.Linear(12, 6)})
    xs = [torch.randn(7, 12), torch.randn(5, 12)]

    def run():
        for x in xs:
            block["qkv"](x)
            block["o"](x)

    stats = collect(block, ["qkv", "o"], run, first_token_weight={"qkv": 64.0})
    ref = sum(x.double().T @ x.double() + 63.0 * x[:1].double().T @ x[:1].double() for x in xs)
    plain = sum(x.double().T @ x.double() for x in xs)
    torch.testing.assert_close(stats["qkv"][0].double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats["o"][0].double(), plain, rtol=1e-5, atol=1e-4)
    assert stats["qkv"][1] == stats["o"][1] == 12  # token counts stay the real ones
