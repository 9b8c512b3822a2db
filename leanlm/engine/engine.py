"""LLMEngine (add_request / step / abort / has_unfinished) and the offline `LLM` on top of it.

The loop is nano-vllm's: schedule, run, postprocess. The engine owns the only mutable state
(queues, cache, generators); the model and the sampler are pure functions of their inputs.
"""
from __future__ import annotations

import copy
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence as Seq

import torch

from leanlm.config import EngineConfig
from leanlm.engine.detokenizer import IncrementalDetokenizer
from leanlm.engine.host import tune_malloc
from leanlm.engine.outputs import CompletionOutput, EngineStats, Logprob, RequestMetrics, RequestOutput
from leanlm.engine.runner import ModelRunner
from leanlm.engine.sampling import Sampler, SamplingParams, SamplingState
from leanlm.engine.scheduler import Scheduler
from leanlm.engine.sequence import Sequence
from leanlm.kv.cache import ContiguousKVCache
from leanlm.kv.spec import build_codec
from leanlm.kv.paged import PagedKVCache, kv_budget_bytes
from leanlm.models.registry import load_model, resolve_model
from leanlm.models.tokenizer import Tokenizer
from leanlm.quant.linear import default_method


KMIX_CALIB_SEQS, KMIX_CALIB_LEN = 8, 512  # kivi kmix calibration: 4k tokens, ~1.5 s for SmolLM2-135M
log = logging.getLogger("leanlm")


def weight_method_factory(config: EngineConfig):
    """Layer name -> QuantMethod: the `quant` spec's format for the decoder's linear layers (and
    the LM head with quant_head), the fastest unquantized method for the rest."""
    dtype, device, spec = config.torch_dtype, config.torch_device, config.quant_spec
    compile = getattr(config, "compile", False)  # draft models pass a namespace without it
    if spec is None:
        return lambda name: default_method(dtype, device, compile)
    if spec.algorithm != "rtn":
        raise ValueError(f"quant spec {str(spec)!r}: only round-to-nearest ('rtn:FORMAT[:gN][:rotate]') "
                         f"is applied at load time; GPTQ needs calibration: `leanlm quantize --quant "
                         f"{spec} -o DIR`, then load DIR")
    from leanlm.formats.registry import get_format
    from leanlm.quant.weight_only import WeightOnlyMethod

    fmt = get_format(spec.format)

    def method(name: str):
        if name == "lm_head" and not config.quant_head:
            return default_method(dtype, device, compile)
        return WeightOnlyMethod.from_spec(fmt, spec, native=not compile)

    return method


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    metrics: RequestMetrics


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        dtype, device = config.torch_dtype, config.torch_device
        if device.type == "cpu":
            tune_malloc()
        self.model_path = resolve_model(config.model)
        from leanlm.quant.checkpoint import is_quantized_checkpoint, load_quantized

        reorder = config.kv_spec is not None and config.kv_spec.reorder
        if is_quantized_checkpoint(self.model_path):  # saved by save_quantized: already quantized
            if reorder:
                raise ValueError(f"kv={config.kv!r} folds the key channel order into float q/k weights at "
                                 f"load; {self.model_path} is already quantized: drop :reorder")
            if config.quant_spec is not None:
                raise ValueError(f"{self.model_path} is already a quantized checkpoint; drop "
                                 f"quant={config.quant!r} (or quantize the original model instead)")
            self.model, self.model_config = load_quantized(self.model_path, dtype, device, config.compile)
        else:
            from leanlm.kv.bfp import fold_key_order, key_pair_order

            self.model, self.model_config = load_model(
                self.model_path, dtype, device, method=weight_method_factory(config),
                prepare=(lambda m: fold_key_order(m, key_pair_order(m))) if reorder else None)
        self.tokenizer = Tokenizer.from_dir(self.model_path)
        limit = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's context of {limit}")
        self.max_model_len = config.max_model_len or limit
        self.cache = self._build_cache()
        self.scheduler = Scheduler(self.cache, config.max_num_seqs, config.max_num_batched_tokens,
                                   share_prompts=config.enable_prefix_caching)
        self.runner = ModelRunner(self.model, self.cache, device, compile=config.compile)
        self.sampler = Sampler()
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.requests: dict[str, _Request] = {}
        self._ids = itertools.count()
        self.speculator = None
        if config.spec_config is not None:
            if config.compile:
                raise ValueError(f"spec={config.spec!r} needs the paged cache (KV rollback); "
                                 "compile=True uses the contiguous cache: drop one of them")
            from leanlm.spec.speculator import build_speculator

            self.speculator = build_speculator(config.spec_config, self)

    def _calibrate_key_bits(self, spec, block_size: int):
        """kivi kmix: the per-channel key bits, from the model run on calibration sequences
        (ShareGPT prompts, never the evaluation text; kv/kmix.py). None for every other spec."""
        if spec is None or spec.kind != "kivi" or not spec.kmix:
            return None
        from leanlm.kv import kmix
        from leanlm.quant.cli import load_calibration

        seq_len = min(KMIX_CALIB_LEN, self.max_model_len)
        t0 = time.perf_counter()
        try:
            seqs = load_calibration(self.tokenizer, num_sequences=KMIX_CALIB_SEQS, seq_len=seq_len)
        except ValueError as e:
            raise ValueError(f"kv spec {spec}: kmix calibrates its key bits on ShareGPT prompts at load, "
                             f"and {e}") from None
        plan = kmix.calibrate(self.model, seqs, spec.bits, block_size)
        log.info("kivi kmix: key bits calibrated on %d x %d tokens in %.1f s", len(seqs), seq_len,
                 time.perf_counter() - t0)
        return plan

    def _build_cache(self):
        """The paged cache sized from the memory budget; with compile=True the contiguous cache,
        whose fixed-shape decode view is what a compiled graph needs (single-stream latency)."""
        cfg, mc = self.config, self.model_config
        dtype, device = cfg.torch_dtype, cfg.torch_device
        if cfg.compile:
            if cfg.kv_spec is not None:
                raise ValueError(f"kv={cfg.kv!r} needs the paged cache; compile=True uses the contiguous "
                                 "cache, which stores K/V in the compute dtype: drop one of them")
            return ContiguousKVCache(mc.num_layers, mc.num_kv_heads, mc.head_dim, dtype, device,
                                     mc.sliding_window)
        bs = cfg.block_size
        key_plan = self._calibrate_key_bits(cfg.kv_spec, bs)

        def codec(num_blocks: int):
            return build_codec(cfg.kv_spec, mc.num_layers, num_blocks, bs, mc.num_kv_heads, mc.head_dim,
                               dtype, device, max_seqs=cfg.max_num_seqs, model=self.model, key_plan=key_plan)

        probe = codec(1)  # what a block costs, and the fixed part (KIVI's residual pool)
        bytes_per_token, fixed = probe.bytes_per_token(), probe.fixed_bytes()
        del probe
        spec = cfg.kv_spec
        stream = None  # eviction: (window, sink) tokens; a sequence then holds at most seat_tokens
        seat_tokens = self.max_model_len
        if spec is not None and spec.window:
            stream = (spec.window, bs if spec.stream_sink is None else spec.stream_sink)
            seat_tokens = min(seat_tokens, stream[0] + stream[1] + bs)
        budget = kv_budget_bytes(cfg.kv_cache_bytes, device)
        # never more than every seat filled to the context (tiny models get tiny pools)
        needed = cfg.max_num_seqs * (-(-seat_tokens // bs) + 1)
        num_blocks = min(int(max(0, budget - fixed) // (bs * bytes_per_token)), needed)
        capacity = num_blocks * bs
        if capacity < seat_tokens:
            if cfg.max_model_len is not None or capacity < 2 * bs:
                raise ValueError(
                    f"the KV cache budget ({budget / 2**20:.1f} MiB, {num_blocks} blocks of {bs} tokens at "
                    f"{bytes_per_token} bytes/token) holds {capacity} tokens, less than "
                    + (f"max_model_len={self.max_model_len}" if stream is None else
                       f"the {seat_tokens} tokens a sequence holds under {spec} (sink + WINDOW + one block)")
                    + "; raise kv_cache_memory or lower max_model_len")
            log.warning("KV cache holds %d tokens: max_model_len lowered from %d", capacity, self.max_model_len)
            self.max_model_len = capacity
        store = codec(num_blocks)
        if stream is not None:
            store.spec = str(spec)  # reports (and prefix hashes) name the eviction too
        return PagedKVCache(store, num_blocks, bs, device, mc.num_kv_heads, mc.sliding_window,
                            cfg.enable_prefix_caching, salt=str(self.model_path), stream=stream)

    # -- requests ------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            text = prompt
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            ids, text = list(prompt), None
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary "
                                 f"[0, {self.model_config.vocab_size})")
        else:
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("the prompt is empty (0 tokens)")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, but the model's context is "
                             f"{self.max_model_len} tokens (prompt + output must fit)")
        return text, ids

    def add_request(self, request_id: str | None, prompt: str | list[int],
                    params: SamplingParams | None = None) -> str:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        text, ids = self.tokenize_prompt(prompt)
        max_len = self.max_model_len if params.max_tokens is None else min(
            self.max_model_len, len(ids) + params.max_tokens)
        seqs = []
        for i in range(params.n):
            # sample i of n is seeded with seed + i: distinct yet each reproducible
            state = SamplingState.create(params, ids, self.generator, self.eos_token_ids, sample_index=i)
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens,
                                           params.stop, params.include_stop_str_in_output,
                                           params.min_tokens)
            seqs.append(Sequence(request_id, i, ids, params, state, detok, max_len))
            seqs[-1].first_sibling = seqs[0] if i > 0 else None
        self.requests[request_id] = _Request(request_id, text, ids, seqs, RequestMetrics(time.time()))
        for seq in seqs:
            self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
                if self.speculator is not None:
                    self.speculator.release(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        stats = self.scheduler.stats()
        if self.speculator is not None:
            stats.spec = copy.copy(self.speculator.stats)
        return stats

    # -- the loop -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        now = time.time()
        for seq, _ in batch:
            m = self.requests[seq.request_id].metrics
            m.first_scheduled_time = m.first_scheduled_time or now
        drafts = self.speculator.plan(batch) if self.speculator is not None else {}
        seqs, logits = self.runner.execute(batch, drafts)
        self.scheduler.computed(batch)
        touched: dict[str, _Request] = {}
        if seqs:
            plain, plain_rows, spec, spec_logits = self._split_rows(seqs, logits, drafts)
            if plain:
                result = self.sampler.sample(logits[plain_rows] if drafts else logits, [s.state for s in plain])
                for i, seq in enumerate(plain):
                    self._append_token(seq, result.token_ids[i], result, i)
            if spec:
                emitted = self.speculator.verify(spec, spec_logits, drafts, self.sampler)
                for seq, tokens in zip(spec, emitted):
                    self._append_verified(seq, tokens, self.speculator.results.pop(seq, None))
            now = time.time()
            for seq in seqs:
                req = self.requests[seq.request_id]
                req.metrics.first_token_time = req.metrics.first_token_time or now
                touched[req.request_id] = req
        outputs = []
        for req in touched.values():
            out = self._output(req)
            if out.finished:
                req.metrics.finished_time = time.time()
                del self.requests[req.request_id]
            outputs.append(out)
        return outputs

    @staticmethod
    def _split_rows(seqs, logits, drafts):
        """Logits rows -> (plain sequences, their rows, drafted sequences, their [k+1, V] blocks)."""
        if not drafts:
            return seqs, None, [], []
        plain, plain_rows, spec, spec_logits = [], [], [], []
        at = 0
        for seq in seqs:
            draft = drafts.get(seq)
            if draft is None:
                plain.append(seq)
                plain_rows.append(at)
                at += 1
            else:
                spec.append(seq)
                spec_logits.append(logits[at:at + len(draft.tokens) + 1])
                at += len(draft.tokens) + 1
        return plain, plain_rows, spec, spec_logits

    def _append_verified(self, seq: Sequence, tokens: list[int], result=None) -> None:
        """Keep the accepted drafts' K/V (roll back the rest, freeing their blocks), make full
        blocks of committed tokens shareable, then emit the tokens until one finishes the sequence."""
        seq.num_cached += len(tokens) - 1
        self.cache.rollback(seq.kv, seq.num_cached)
        self.cache.commit(seq.kv, seq.token_ids + tokens[:-1], seq.num_cached)
        for row, token in enumerate(tokens):
            self._append_token(seq, token, result, row)  # result: logprobs row per token, if asked
            if seq.is_finished:
                break

    def _append_token(self, seq: Sequence, token: int, result, row: int) -> None:
        seq.token_ids.append(token)
        seq.state.append(token)
        if seq.logprobs is not None:
            sampled = result.logprobs[row]
            top = result.top_logprobs[row] or []
            entry = {tid: Logprob(v, rank) for rank, (tid, v) in enumerate(top, start=1)}
            entry.setdefault(token, Logprob(sampled))
            for tid, lp in entry.items():
                lp.decoded_token = self.tokenizer.decode([tid], skip_special_tokens=False)
            seq.logprobs.append(entry)
            seq.cumulative_logprob += sampled
        p = seq.params
        step = seq.detok.step(token)
        seq.last_delta += step.delta  # a verified draft appends several tokens in one step
        if step.stopped:
            return self._finish(seq, "stop", step.stop_reason)
        if not p.ignore_eos and token in self.eos_token_ids and seq.num_output_tokens >= p.min_tokens:
            return self._finish(seq, "stop", None)
        if p.stop_token_ids and token in p.stop_token_ids and seq.num_output_tokens >= p.min_tokens:
            return self._finish(seq, "stop", token)
        if len(seq.token_ids) >= seq.max_len:
            return self._finish(seq, "length", None)

    def _finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        if not seq.detok.finished:  # flush text held back for a possible stop string
            tail = seq.detok.finish()
            seq.last_delta += tail.delta
            if tail.stopped:
                reason, stop_reason = "stop", tail.stop_reason
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)
        if self.speculator is not None:
            self.speculator.release(seq)

    def _output(self, req: _Request) -> RequestOutput:
        outs = [CompletionOutput(
            index=s.index, text=s.text, token_ids=s.output_token_ids, finish_reason=s.finish_reason,
            stop_reason=s.stop_reason, logprobs=s.logprobs,
            cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None)
            for s in req.seqs]
        deltas = {s.index: s.last_delta for s in req.seqs}
        for s in req.seqs:
            s.last_delta = ""
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs,
                             finished=all(s.is_finished for s in req.seqs), metrics=req.metrics,
                             deltas=deltas)


class LLM:
    """Offline generation, vLLM style: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "cpu",
                 seed: int = 0, **kwargs):
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype, device=device, seed=seed, **kwargs))
        self.tokenizer = self.engine.tokenizer

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompts))
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(None, prompt, p))
        except ValueError:
            for rid in ids:  # nothing half-done: drop what was already queued
                self.engine.abort(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             add_generation_prompt: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode_chat(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    @torch.inference_mode()
    def score(self, token_ids: list[int], chunk: int = 512) -> torch.Tensor:
        """Log-probability of each token given those before it: float64 [len - 1].

        The sequence is fed `chunk` tokens at a time and every chunk attends to the cache as it
        is stored, so chunk=1 scores exactly what token-by-token decoding sees."""
        eng = self.engine
        if eng.has_unfinished():
            raise RuntimeError("score() needs an idle engine")
        if not 2 <= len(token_ids) <= eng.max_model_len:
            raise ValueError(f"score() needs 2..{eng.max_model_len} tokens, got {len(token_ids)}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        from leanlm.kv.cache import SeqSlice

        device = eng.config.torch_device
        ids = torch.tensor(token_ids, device=device)
        handle, _ = eng.cache.admit([], len(token_ids))  # fresh room: every position is computed
        out = []
        try:
            if not eng.cache.reserve(handle, len(token_ids)):
                raise RuntimeError(f"the KV cache cannot hold {len(token_ids)} tokens")
            for start in range(0, len(token_ids) - 1, chunk):
                n = min(chunk, len(token_ids) - 1 - start)
                ctx = eng.cache.prepare([SeqSlice(handle, start, n, 0)])
                hidden = eng.model(ids[start:start + n], torch.arange(start, start + n, device=device),
                                   eng.cache, ctx)
                logp = torch.log_softmax(eng.model.compute_logits(hidden).double(), dim=-1)
                out.append(logp.gather(1, ids[start + 1:start + n + 1, None]).squeeze(1))
        finally:
            eng.cache.release(handle)
        return torch.cat(out).cpu()

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield a RequestOutput each step for one request; `.deltas[0]` is the new text."""
        rid = self.engine.add_request(None, prompt, sampling_params)
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort(rid)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="generating", unit="req")
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar:
                            bar.update(1)
        finally:
            if bar:
                bar.close()
            for rid in ids:
                if rid not in done:
                    self.engine.abort(rid)
        return [done[rid] for rid in ids]


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    return prompts


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None or isinstance(params, SamplingParams):
        return [params or SamplingParams()] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts; give one or one per prompt")
    return params
