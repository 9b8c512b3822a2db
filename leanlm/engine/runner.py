"""ModelRunner: turns a scheduled batch into flat tensors, runs the model once, and returns the
logits of the sequences that need a new token (those whose whole context is now cached)."""
from __future__ import annotations

import torch

from leanlm.engine.sequence import Sequence
from leanlm.kv.cache import KVCache, SeqSlice


class ModelRunner:
    def __init__(self, model, cache: KVCache, device: torch.device, compile: bool = False):
        self.model, self.cache, self.device = model, cache, device
        self.compiled_decode = None
        if compile:
            import torch._inductor.config as inductor_config

            # Weights become constants that inductor prepacks (oneDNN / AMX GEMMs on CPU).
            inductor_config.freezing = True
            # GEMM autotuning picks the AMX / oneDNN kernels for the frozen weights: the
            # measured difference at batch-1 decode (see docs/BENCHMARKS.md), for a longer compile.
            inductor_config.max_autotune = True
            # Only decode steps are compiled: their shapes are static (see StaticDecodeView);
            # prefill chunks vary in length and are matmul-bound anyway, so they stay eager.
            self.compiled_decode = torch.compile(model.forward)  # a new shape recompiles once, as dynamic

    @torch.inference_mode()
    def execute(self, batch: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        ids: list[int] = []
        positions: list[int] = []
        slices: list[SeqSlice] = []
        sample_rows: list[int] = []
        to_sample: list[Sequence] = []
        for seq, n in batch:
            start = seq.num_cached
            slices.append(SeqSlice(seq.kv, start, n, len(ids)))
            ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            seq.num_cached = start + n
            if seq.num_cached == len(seq.token_ids):
                sample_rows.append(len(ids) - 1)
                to_sample.append(seq)
        ids_t = torch.tensor(ids, device=self.device)
        pos_t = torch.tensor(positions, device=self.device)
        ctx = self.cache.prepare(slices)
        view = self.cache.static_decode_view(ctx) if self.compiled_decode is not None else None
        if view is not None:
            hidden = self.compiled_decode(ids_t, pos_t, view, pos_t)
        else:
            hidden = self.model(ids_t, pos_t, self.cache, ctx)
        if not to_sample:
            return [], hidden.new_empty(0)
        if len(sample_rows) != hidden.shape[0]:
            hidden = hidden[torch.tensor(sample_rows, device=self.device)]
        return to_sample, self.model.compute_logits(hidden).float()
