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
            # The compiled decode graph launches ~450 small kernels per token; a C++ wrapper
            # instead of the Python one cuts their launch cost (INT8 bf16 decode of the embedded
            # model, same process: 61.9 -> 68.4 tok/s, docs/BENCHMARKS.md).
            inductor_config.cpp_wrapper = True
            # Only decode steps are compiled: their shapes are static (see StaticDecodeView);
            # prefill chunks vary in length and are matmul-bound anyway, so they stay eager.
            self.compiled_decode = torch.compile(model.forward)  # a new shape recompiles once, as dynamic
        # Decode shapes (batch rows, cache length) whose graph dynamo has already selected once
        # with its full guards; see _decode.
        self._warm_decode_shapes: set[tuple] = set()

    @torch.inference_mode()
    def execute(self, batch: list[tuple[Sequence, int]],
                drafts: dict | None = None) -> tuple[list[Sequence], torch.Tensor]:
        """-> the sequences that get tokens and their logits, one row each; a sequence with a
        draft (speculative decoding) gets k + 1 rows: [last token, d_1..d_k] are verified in this
        same forward, and only its last token counts as cached until the verifier decides."""
        drafts = drafts or {}
        ids: list[int] = []
        positions: list[int] = []
        slices: list[SeqSlice] = []
        sample_rows: list[int] = []
        to_sample: list[Sequence] = []
        for seq, n in batch:
            start = seq.num_cached
            draft = drafts.get(seq)
            extra = draft.tokens if draft is not None else []
            slices.append(SeqSlice(seq.kv, start, n + len(extra), len(ids)))
            ids.extend(seq.token_ids[start:start + n])
            ids.extend(extra)
            positions.extend(range(start, start + n + len(extra)))
            seq.num_cached = start + n
            if seq.num_cached == len(seq.token_ids):
                sample_rows.extend(range(len(ids) - len(extra) - 1, len(ids)))
                to_sample.append(seq)
        ids_t = torch.tensor(ids, device=self.device)
        pos_t = torch.tensor(positions, device=self.device)
        resume = [d for d in drafts.values() if d.hidden is not None]
        if resume and getattr(self.cache, "split_steps", False):
            hidden = self._resume(batch, drafts, slices, ids_t, pos_t, resume[0].skip)
        else:
            ctx = self.cache.prepare(slices)
            view = self.cache.static_decode_view(ctx) if self.compiled_decode is not None else None
            if view is not None:
                hidden = self._decode(ids_t, pos_t, view)
            else:
                hidden = self.model(ids_t, pos_t, self.cache, ctx)
        if not to_sample:
            return [], hidden.new_empty(0)
        if len(sample_rows) != hidden.shape[0]:
            hidden = hidden[torch.tensor(sample_rows, device=self.device)]
        return to_sample, self.model.compute_logits(hidden).float()

    def _decode(self, ids_t: torch.Tensor, pos_t: torch.Tensor, view) -> torch.Tensor:
        """One compiled decode step. Dynamo's guards on the model's ~300 frozen parameters and
        the view's 60 cache tensors cost ~0.9 ms a token (of ~30 in float32); once a shape has
        been through the full guards (compiling if needed), later steps of that shape run only
        the guards that tell the cached graphs apart. Safe here because nothing a guard would
        catch changes between decode steps of one shape: the graph does not specialise on the
        cache tensors' identity, and the model's weights and flags are fixed after loading."""
        shape = (ids_t.shape[0], tuple(view.k[0].shape), view.k[0].dtype)
        if shape not in self._warm_decode_shapes:
            hidden = self.compiled_decode(ids_t, pos_t, view, pos_t)
            self._warm_decode_shapes.add(shape)
            return hidden
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return self.compiled_decode(ids_t, pos_t, view, pos_t)

    def _resume(self, batch, drafts, slices, ids_t, pos_t, skip: int) -> torch.Tensor:
        """Early-exit verification: drafted sequences already ran layers < skip (their K/V is in
        the cache, their residual stream in the draft); only the others run those layers here,
        then every token runs layers >= skip together."""
        x = torch.empty(len(ids_t), self.model.cfg.hidden_size, dtype=self.model.dtype, device=self.device)
        low_rows: list[int] = []
        low_slices: list[SeqSlice] = []
        for (seq, _), s in zip(batch, slices):
            draft = drafts.get(seq)
            if draft is not None and draft.hidden is not None:
                x[s.q_offset:s.q_offset + s.n] = draft.hidden
            else:
                low_slices.append(SeqSlice(s.kv, s.start, s.n, len(low_rows)))
                low_rows.extend(range(s.q_offset, s.q_offset + s.n))
        if low_rows:
            rows = torch.tensor(low_rows, device=self.device)
            low_ctx = self.cache.prepare(low_slices)
            x[rows] = self.model.run_layers(self.model.embed_tokens(ids_t[rows]), pos_t[rows],
                                            self.cache, low_ctx, 0, skip)
        ctx = self.cache.prepare(slices)
        return self.model.norm(self.model.run_layers(x, pos_t, self.cache, ctx, skip))
