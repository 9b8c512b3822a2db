"""The native kernels built for another instruction set than this CPU's ($LEANLM_NATIVE_MARCH).

The kernels pick their vector width and tile sizes at compile time (AVX-512: 16 floats a vector,
12-row GEMM tiles; otherwise 8 floats, 6-row tiles), so a CI machine with AVX-512 would never run
the AVX2 code that most laptops and many servers get. These tests build it with
-march=x86-64-v3 (AVX2 + FMA) in a subprocess and check it against this machine's build: the
GEMMs bit for bit (each output is the same chain of FMAs over k at any width), attention and
the fused ops to float32 rounding."""
import os
import platform
import subprocess
import sys

import pytest
import torch

from leanlm import native
from leanlm.native import gemm, ops, qgemm

pytestmark = pytest.mark.skipif(gemm.kernel() is None, reason="no C compiler: the torch path is used")


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and f" {flag}" in line for line in f)
    except OSError:
        return False


# what both builds compute (run here and in the subprocess): outputs keyed by case
SCRIPT = r"""
import sys, torch
from leanlm.native import gemm, qgemm, ops
assert gemm.kernel() is not None and qgemm.kernel() is not None and ops.available()
g = torch.Generator().manual_seed(0)
out, ref, tol = {}, {}, {}  # outputs, float64 references, allowed error (float32 rounding)
for M in (1, 2, 3, 5, 7, 9, 13, 64, 130):
    for N, K in ((40, 17), (200, 96), (96, 576)):
        x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
        out[f"sgemm {M} {N} {K}"] = gemm.linear(x, gemm.pack(w), N, b)
        ref[f"sgemm {M} {N} {K}"] = x.double() @ w.double().T + b.double()
        tol[f"sgemm {M} {N} {K}"] = 4 * (K + 1) * 2**-24 * (x.double().abs() @ w.double().abs().T + b.double().abs()) + 1e-6
        codes = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        scales = torch.rand(N, generator=g) * 0.01
        out[f"qgemm {M} {N} {K}"] = qgemm.linear(x, qgemm.pack(codes), scales, N, b)
        wq = codes.double() * scales.double()[:, None]
        ref[f"qgemm {M} {N} {K}"] = x.double() @ wq.T + b.double()
        tol[f"qgemm {M} {N} {K}"] = 4 * (K + 2) * 2**-24 * (x.double().abs() @ wq.abs().T + b.double().abs()) + 1e-6
bs = 16
for D, dtype in ((64, torch.float32), (64, torch.bfloat16), (128, torch.float32), (48, torch.float32)):
    kc = torch.randn(40 * bs, 3, D, generator=g).to(dtype)
    vc = torch.randn(40 * bs, 3, D, generator=g).to(dtype)
    tables = torch.stack([torch.randperm(40, generator=g)[:5] for _ in range(4)])
    lens = torch.tensor([1, 16, 37, 80])
    q = torch.randn(4, 9, D, generator=g)
    out[f"attention {D} {dtype}"] = ops.paged_attention(q, kc, vc, tables, lens, bs)
    rows = []
    for r in range(4):
        slots = (tables[r, :, None] * bs + torch.arange(bs)).reshape(-1)[: int(lens[r])]
        k, v = kc[slots].double().repeat_interleave(3, 1), vc[slots].double().repeat_interleave(3, 1)
        a = torch.softmax(torch.einsum("hd,thd->ht", q[r].double(), k) / D ** 0.5, -1)
        rows.append(torch.einsum("ht,thd->hd", a, v))
    ref[f"attention {D} {dtype}"], tol[f"attention {D} {dtype}"] = torch.stack(rows), 1e-5
x, h, w = torch.randn(5, 576, generator=g), torch.randn(5, 576, generator=g), torch.randn(576, generator=g)
rms = lambda t: t.double() / (t.double().pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w.double()
out["rms_norm"], ref["rms_norm"] = ops.rms_norm(x, w, 1e-5), rms(x)
out["add_rms_norm"] = torch.cat(ops.add_rms_norm(x, h, w, 1e-5))
ref["add_rms_norm"] = torch.cat((x.double() + h.double(), rms(x + h)))
gu = torch.randn(5, 2 * 1539, generator=g) * 4
out["silu_mul"] = ops.silu_mul(gu)
ref["silu_mul"] = torch.nn.functional.silu(gu[:, :1539].double()) * gu[:, 1539:].double()
for key in ("rms_norm", "add_rms_norm", "silu_mul"):
    tol[key] = 1e-6 * (1 + ref[key].abs())
torch.save((out, ref, tol), sys.argv[1])
"""


def _outputs(tmp_path, name: str, march: str | None) -> dict:
    env = dict(os.environ, LEANLM_CACHE=str(tmp_path / f"cache-{name}"))
    env.pop(native.MARCH_ENV, None)
    if march:
        env[native.MARCH_ENV] = march
    path = tmp_path / f"{name}.pt"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(path)  # (outputs, float64 references, tolerances)


@pytest.mark.skipif(platform.machine() != "x86_64" or not _cpu_has("avx2") or not _cpu_has("fma"),
                    reason="x86-64-v3 code needs an x86-64 CPU with AVX2 and FMA to run")
def test_avx2_build_matches_this_machines_build(tmp_path):
    here, _, _ = _outputs(tmp_path, "native", None)
    avx2, ref, tol = _outputs(tmp_path, "avx2", "x86-64-v3")
    assert here.keys() == avx2.keys() == ref.keys()
    for key, a in here.items():
        b = avx2[key]
        assert ((b.double() - ref[key]).abs() <= tol[key]).all(), key  # the AVX2 build is right on its own
        if key.startswith(("sgemm", "qgemm")):
            assert torch.equal(a, b), key  # the same FMA chain per output at any vector width
        else:  # sums over 8 or 16 lanes: float32 rounding apart
            assert (a - b).abs().max() <= 1e-5 * max(1.0, float(a.abs().max())), key


def test_native_march_selects_the_build(monkeypatch, tmp_path):
    """$LEANLM_NATIVE_MARCH is part of the flags and the cache key; a value the compiler rejects
    is a clear build error (callers then fall back to torch with a warning)."""
    monkeypatch.setenv("LEANLM_CACHE", str(tmp_path))
    monkeypatch.delenv(native.MARCH_ENV, raising=False)
    assert native.cflags()[-1] == "-march=native"
    default = native.build("sgemm")
    monkeypatch.setenv(native.MARCH_ENV, "x86-64" if platform.machine() == "x86_64" else "native")
    other = native.build("sgemm")
    assert native.cflags()[-1].startswith("-march=")
    if platform.machine() == "x86_64":
        assert other != default
    monkeypatch.setenv(native.MARCH_ENV, "no-such-cpu")
    with pytest.raises(RuntimeError, match=r"-march=no-such-cpu \(from \$LEANLM_NATIVE_MARCH\)"):
        native.build("sgemm")


@pytest.mark.skipif(platform.machine() != "x86_64" or not _cpu_has("avx512f") or not _cpu_has("avx2"),
                    reason="this CPU's own build is the AVX2 build (or cannot run it): the other "
                           "kivi tests already run that code here")
def test_avx2_build_passes_the_kivi_kernel_tests(tmp_path):
    """The KIVI kernel tests (codes against the dequantized torch path, the executor against the
    module path bit for bit) on the AVX2 build, run on an AVX-512 machine."""
    env = dict(os.environ, LEANLM_CACHE=str(tmp_path / "cache"), **{native.MARCH_ENV: "x86-64-v3"})
    here = os.path.dirname(__file__)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        os.path.join(here, "test_kivi_attention.py"), os.path.join(here, "test_kv_executor.py")],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout
