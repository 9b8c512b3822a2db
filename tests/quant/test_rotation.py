"""Block Walsh-Hadamard rotation: exactness against the dense matrix, orthonormality, the
weight/activation folding identity, and that it helps quantization when weights have outliers."""
import math

import pytest
import torch

from leanlm.formats.registry import get_format
from leanlm.quant.rotation import (Rotation, fwht, hadamard_matrix, pick_block, rotate_activation,
                                   rotate_weight)

BLOCKS = (16, 32, 64, 128)
LEADING = ((), (3,), (2, 5))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def blockdiag_hadamard(K, block):
    return torch.block_diag(*[hadamard_matrix(block)] * (K // block))


def max_over_rms(v):
    return (v.abs().max() / v.pow(2).mean().sqrt()).item()


def test_hadamard_matrix_is_symmetric_orthonormal():
    for n in (1, 2, 16, 128):
        h = hadamard_matrix(n)
        assert torch.equal(h, h.T)
        torch.testing.assert_close(h @ h, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    h2 = torch.tensor([[1., 1.], [1., -1.]], dtype=torch.float64)
    assert torch.equal(hadamard_matrix(2) * math.sqrt(2), h2)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("lead", LEADING)
def test_fwht_equals_blockdiag_matrix(block, lead):
    K = 3 * block
    x = torch.randn(*lead, K, generator=gen(block), dtype=torch.float64)
    ref = x @ blockdiag_hadamard(K, block)
    torch.testing.assert_close(fwht(x, block), ref, rtol=0, atol=1e-12)
    # float32 is computed in float32: close to the float64 reference at float32 precision
    torch.testing.assert_close(fwht(x.float(), block).double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("block", BLOCKS)
def test_fwht_is_its_own_inverse_and_preserves_norms(block):
    x = torch.randn(4, 7, 2 * block, generator=gen(1), dtype=torch.float64)
    y = fwht(x, block)
    torch.testing.assert_close(fwht(y, block), x, rtol=0, atol=1e-12)
    # orthonormal per block, so the norm of every block (and every row) is kept
    torch.testing.assert_close(y.reshape(-1, block).norm(dim=-1), x.reshape(-1, block).norm(dim=-1),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fwht_keeps_dtype_and_shape(dtype):
    x = torch.randn(2, 3, 128, generator=gen(2))
    y = fwht(x.to(dtype), 64)
    assert y.dtype == dtype and y.shape == x.shape
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(y.float(), fwht(x.double(), 64).float(), rtol=tol, atol=tol * 4)


def test_fwht_errors():
    with pytest.raises(ValueError, match=r"multiple of block 64.*last dim 96"):
        fwht(torch.zeros(2, 96), 64)
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.zeros(2, 96), 48)
    with pytest.raises(ValueError, match="scalar"):
        fwht(torch.tensor(1.0), 16)
    with pytest.raises(TypeError, match="floating"):
        fwht(torch.zeros(2, 32, dtype=torch.int32), 16)
    assert fwht(torch.zeros(0, 32), 16).shape == (0, 32)


@pytest.mark.parametrize("block", BLOCKS)
def test_folding_identity(block):
    N, K = 24, 4 * block
    W = torch.randn(N, K, generator=gen(3), dtype=torch.float64)
    x = torch.randn(2, 5, K, generator=gen(4), dtype=torch.float64)
    y = x @ W.T
    # rotate_weight is W @ H_blockdiag
    torch.testing.assert_close(rotate_weight(W, block), W @ blockdiag_hadamard(K, block), rtol=0, atol=1e-12)
    torch.testing.assert_close(rotate_activation(x, block) @ rotate_weight(W, block).T, y, rtol=0, atol=1e-10)
    y32 = rotate_activation(x.float(), block) @ rotate_weight(W.float(), block).T
    torch.testing.assert_close(y32.double(), y, rtol=1e-4, atol=1e-4)


def test_rotation_object():
    rot = Rotation.for_features(576, 128)
    assert rot.block == 64 and rot.spec_str() == "hadamard:b64"
    W = torch.randn(8, 576, generator=gen(5), dtype=torch.float64)
    x = torch.randn(3, 576, generator=gen(6), dtype=torch.float64)
    torch.testing.assert_close(rot.activation(x) @ rot.weight(W).T, x @ W.T, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="power of two"):
        Rotation(24)


def test_pick_block():
    assert pick_block(1536, 128) == 128          # SmolLM2 MLP down_proj K = 12 * 128
    assert pick_block(576, 128) == 64            # SmolLM2 hidden K = 9 * 64
    assert pick_block(576, 64) == 64
    assert pick_block(576, 16) == 16             # the requested block is kept when it divides K
    assert pick_block(48, 32) == 16
    with pytest.raises(ValueError, match=r"K=40.*largest power of two dividing it is 8"):
        pick_block(40, 16)
    with pytest.raises(ValueError, match="power of two >= 16"):
        pick_block(576, 8)
    with pytest.raises(ValueError, match="power of two >= 16"):
        pick_block(576, 96)
    with pytest.raises(ValueError, match="positive integer"):
        pick_block(0, 64)


def test_rotation_spreads_a_weight_outlier():
    w = torch.randn(2, 256, generator=gen(7))
    w[0, 7] = 100.0  # one huge outlier in the first 128-block of row 0
    before, after = max_over_rms(w[0]), max_over_rms(rotate_weight(w, 128)[0])
    assert after * 4 <= before, (before, after)


@pytest.mark.parametrize("fmt_name", ["int4-sym", "int4"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rotation_lowers_int4_error_with_outlier_columns(fmt_name, seed):
    fmt = get_format(fmt_name)
    g = gen(seed)
    N, K, block = 64, 256, 64
    W = torch.randn(N, K, generator=g, dtype=torch.float64)
    W[:, torch.randperm(K, generator=g)[:4]] *= 30  # heavy outlier input columns
    x = torch.randn(32, K, generator=g, dtype=torch.float64)
    y = x @ W.T

    def rel_err(y_hat):
        return ((y_hat - y).norm() / y.norm()).item()

    # RTN per output channel (group_size=None), with and without the rotation folded in
    plain = rel_err(x @ fmt.dequantize(fmt.quantize(W)).double().T)
    Wr_hat = fmt.dequantize(fmt.quantize(rotate_weight(W, block))).double()
    rotated = rel_err(rotate_activation(x, block) @ Wr_hat.T)
    assert rotated * 1.5 < plain, (plain, rotated)  # observed ~2-2.6x lower
