"""Calibration statistics for GPTQ: H = sum over tokens of x x^T (= X^T X) for each Linear.

A forward pre-hook on each chosen Linear flattens its input to [T, K] and adds X^T X (float32)
and T to the running totals; nothing about the model changes and the outputs are untouched.

    with HessianCollector({"q_proj": layer.attn.q_proj, ...}) as hc:
        for hidden in calibration_batches:
            layer(hidden, ...)
    H, tokens = hc.hessian("q_proj"), hc.tokens["q_proj"]

`first_token_weight` counts the first token of each input (one calibration sequence per call)
as that many tokens. Layer-by-layer quantization gives it to the attention input projection:
the first token is the attention sink, whose key and value every later query reads, so an
error there costs once per reader, not once. Unweighted, GPTQ minimises the total error by
moving it into the sink's rare direction (massive-activation channels) and the model breaks
(SmolLM2 INT4 g128: GPTQ on q/k/v alone took WikiText ppl from 31.9 with RTN to 36.3; with the
sink counted 128x, to 29.4 — docs/BENCHMARKS.md).

The raw sum is kept (not the mean, nor the reference's 2/T scaling): GPTQ's result does not
depend on H's scale because its dampening is relative to mean(diag H). Layer-by-layer model
calibration (inputs recomputed through the already-quantized earlier layers) builds on these.
"""
from __future__ import annotations

import torch
from torch import nn


class HessianCollector:
    """Accumulates X^T X and the token count of the inputs of named modules while attached."""

    def __init__(self, modules: dict[str, nn.Module], first_token_weight: dict[str, float] | None = None):
        self.modules = dict(modules)
        self.first_token_weight = dict(first_token_weight or {})
        self.H: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {name: 0 for name in self.modules}
        self._handles = []

    def attach(self) -> "HessianCollector":
        if not self._handles:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "HessianCollector":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def add(self, name: str, x: torch.Tensor) -> None:
        """Add the tokens of x [..., K] to `name`'s totals (also usable without hooks)."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if name not in self.H:
            self.H[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        self.H[name].addmm_(x.T, x)
        w0 = self.first_token_weight.get(name, 1.0)
        if w0 != 1.0 and x.shape[0] > 1:
            self.H[name].addmm_(x[:1].T, x[:1], alpha=w0 - 1.0)
        self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]

    def hessian(self, name: str) -> torch.Tensor:
        """H = X^T X [K, K] float32 for `name`; a KeyError if it never saw an input."""
        if name not in self.H:
            raise KeyError(f"no calibration input reached {name!r}")
        return self.H[name]

    def _hook(self, name: str):
        def hook(module, args, kwargs=None):
            self.add(name, args[0])
        return hook



def collect(layer: nn.Module, linear_names: list[str], run_fn,
            first_token_weight: dict[str, float] | None = None) -> dict[str, tuple[torch.Tensor, int]]:
    """Run `run_fn()` (which pushes calibration inputs through `layer`) with hooks on the
    sub-modules `linear_names` (dotted paths inside `layer`); returns name -> (H, tokens)."""
    hc = HessianCollector({n: layer.get_submodule(n) for n in linear_names}, first_token_weight)
    with hc, torch.no_grad():
        run_fn()
    return {n: (hc.hessian(n), hc.tokens[n]) for n in linear_names}
