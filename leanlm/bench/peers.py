"""Peer engines timed with exactly the protocol leanlm is timed with (see latency.py).

Each target offers two measurements on given token ids (and HFPeer a third, `generate_batched`,
for the throughput bench):
- `prefill_seconds(ids)`: run the prompt through the model once, producing the last position's logits;
- `decode_tps(ids, n)`: greedy-generate n + 1 tokens and return n / (time of the last token - time of
  the first token), i.e. tokens per second of the decode steps only, prefill excluded.
"""
from __future__ import annotations

import time

import torch

PEERS = ("hf", "llama.cpp")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LeanlmTarget:
    """leanlm through its public API: `LLM.generate` for prefill, `LLM.stream` for decode."""

    name = "leanlm"

    def __init__(self, llm):
        self.llm = llm

    def prefill_seconds(self, ids: list[int]) -> float:
        from leanlm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        self.llm.generate(list(ids), params)
        return time.perf_counter() - t0

    def decode_tps(self, ids: list[int], n: int) -> float:
        from leanlm import SamplingParams

        params = SamplingParams(max_tokens=n + 1, temperature=0.0, ignore_eos=True)
        stamps: list[tuple[float, int]] = []
        for out in self.llm.stream(list(ids), params):
            stamps.append((time.perf_counter(), len(out.outputs[0].token_ids)))
        (t_first, n_first), (t_last, n_last) = stamps[0], stamps[-1]
        if n_first != 1 or n_last != n + 1:
            raise RuntimeError(f"leanlm streamed {n_first}..{n_last} tokens, expected 1..{n + 1}")
        return n / (t_last - t_first)


class HFPeer:
    """Hugging Face transformers, same checkpoint, same dtype and device, eager `generate`."""

    name = "hf"

    def __init__(self, model_path, dtype: torch.dtype, device: torch.device):
        try:
            import transformers
        except ImportError:
            raise ValueError("--vs hf needs the transformers package (pip install 'leanlm[test]')") from None
        transformers.utils.logging.set_verbosity_error()  # generation-config chatter
        self.device = torch.device(device)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            str(model_path), dtype=dtype).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.pad_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
        # EOS ignored as leanlm's ignore_eos does it: no stop check and no EOS-suppressing logits
        # processor (which min_new_tokens alone would add); min_new_tokens stays as a guard
        self.model.generation_config.eos_token_id = None

    @torch.inference_mode()
    def prefill_seconds(self, ids: list[int]) -> float:
        x = torch.tensor([list(ids)], device=self.device)
        _sync(self.device)
        t0 = time.perf_counter()
        self.model(x, use_cache=True, logits_to_keep=1)
        _sync(self.device)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def decode_tps(self, ids: list[int], n: int) -> float:
        stamps = _Stamps()
        x = torch.tensor([list(ids)], device=self.device)
        out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n + 1,
                                  min_new_tokens=n + 1, do_sample=False, pad_token_id=self.pad_id,
                                  streamer=stamps)
        got = out.shape[1] - x.shape[1]
        # the streamer sees the prompt first, then each new token as it is chosen
        if got != n + 1 or len(stamps.times) != n + 2:
            raise RuntimeError(f"transformers generated {got} tokens ({len(stamps.times) - 1} streamed), "
                               f"expected {n + 1}")
        return n / (stamps.times[-1] - stamps.times[1])

    @torch.inference_mode()
    def generate_batched(self, prompts: list[list[int]], output_len: int, batch_size: int,
                         progress=None) -> float:
        """Seconds to greedy-generate exactly `output_len` tokens for every prompt with batched,
        left-padded `generate` calls of up to `batch_size` rows (the throughput bench's HF peer).

        Rows are batched in order of prompt length so that padding wastes little work: kinder to
        transformers than vLLM's in-order batching, so a leanlm/hf ratio is not inflated by it."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        batches = [[prompts[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
        padded = []
        for batch in batches:  # built before the clock starts: only generation is timed
            width = max(len(p) for p in batch)
            ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in batch], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=self.device)
            padded.append((ids, mask))
        _sync(self.device)
        t0 = time.perf_counter()
        for ids, mask in padded:
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=output_len,
                                      min_new_tokens=output_len, do_sample=False, pad_token_id=self.pad_id)
            if out.shape[1] - ids.shape[1] != output_len:
                raise RuntimeError(f"transformers generated {out.shape[1] - ids.shape[1]} tokens per row, "
                                   f"expected {output_len}")
            if progress is not None:
                progress(ids.shape[0])
        _sync(self.device)
        return time.perf_counter() - t0


def _Stamps():
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    return Stamps()


class LlamaCppPeer:
    """llama.cpp through llama-cpp-python (the optional `peers` extra) on a GGUF of the same weights,
    with the same thread count; greedy decoding with EOS ignored, as leanlm is timed.

    Loaded with `use_extra_bufts = False`: on CPUs with AMX, llama.cpp's AMX / repack buffers crash
    the first decode of Q4_1 and Q8_0 models (llama.cpp issue #20824), and llama-cpp-python has no
    argument for it, so its default-params function is wrapped for the duration of the load."""

    name = "llama.cpp"

    def __init__(self, gguf_path, threads: int, n_ctx: int = 2048):
        try:
            import llama_cpp
        except ImportError:
            raise ValueError("--vs llama.cpp needs llama-cpp-python: pip install 'leanlm[peers]' "
                             "(it compiles llama.cpp; a C++ compiler and cmake are needed)") from None
        self.gguf_path = str(gguf_path)
        low = llama_cpp.llama_cpp
        original = low.llama_model_default_params

        def params_without_extra_bufts():
            params = original()
            if hasattr(params, "use_extra_bufts"):
                params.use_extra_bufts = False
            return params

        low.llama_model_default_params = params_without_extra_bufts
        llama_cpp.llama_model_default_params = params_without_extra_bufts
        try:
            self.model = llama_cpp.Llama(self.gguf_path, n_ctx=n_ctx, n_batch=512, n_ubatch=512,
                                         n_threads=threads, n_threads_batch=threads,
                                         logits_all=False, verbose=False)
        finally:
            low.llama_model_default_params = original
            llama_cpp.llama_model_default_params = original
        self.version = getattr(llama_cpp, "__version__", "?")
        import gguf

        from leanlm.models.gguf_requant import matrix_types

        reader = gguf.GGUFReader(self.gguf_path)
        # bytes read per decoded token: every matrix (the tied embedding is the LM head too)
        self.weight_bytes = sum(int(t.n_bytes) for t in reader.tensors if len(t.shape) >= 2)
        self.gguf_type = "+".join(sorted(matrix_types(reader)))

    def prefill_seconds(self, ids: list[int]) -> float:
        self.model.reset()
        t0 = time.perf_counter()
        self.model.eval(list(ids))
        return time.perf_counter() - t0

    def decode_tps(self, ids: list[int], n: int) -> float:
        self.model.reset()
        times: list[float] = []
        for _ in self.model.generate(list(ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                     repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter())
            if len(times) == n + 1:
                break
        return n / (times[-1] - times[0])


# leanlm's quantization or dtype -> the GGUF type llama.cpp runs for the same comparison
PEER_GGUF_TYPES = {"int8": "Q8_0", "int4": "Q4_1", "float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def peer_gguf_for(llm, source_gguf, gguf_type: str | None = None) -> "Path":
    """The GGUF llama.cpp runs: `source_gguf` re-encoded as `gguf_type` (by default the type that
    matches leanlm's quantization or dtype, see PEER_GGUF_TYPES), cached next to the embedded
    model's checkpoint so the conversion happens once."""
    from pathlib import Path

    from leanlm.models.embedded import cache_root, file_fingerprint
    from leanlm.models.gguf_requant import TARGET_TYPES, matrix_types, requantize_gguf

    if source_gguf is None:
        raise ValueError("--vs llama.cpp needs the model as a GGUF file (the embedded model, or "
                         "--model FILE.gguf), or --peer-gguf FILE.gguf")
    source = Path(source_gguf)
    if gguf_type is None:
        spec = llm.engine.config.quant_spec
        key = spec.format if spec is not None else str(llm.engine.config.torch_dtype).removeprefix("torch.")
        gguf_type = PEER_GGUF_TYPES.get(key)
        if gguf_type is None:
            raise ValueError(f"no llama.cpp type matches {key!r}; pass --peer-gguf-type "
                             f"({', '.join(TARGET_TYPES)}) or --peer-gguf FILE")
    import gguf

    current = matrix_types(gguf.GGUFReader(str(source)))
    if current == {gguf_type}:
        return source
    out = cache_root() / "gguf" / f"{file_fingerprint(source)}.{gguf_type}.gguf"
    if not out.is_file():
        requantize_gguf(source, out, gguf_type)
    return out


def make_peer(name: str, llm, source_gguf=None, gguf_type: str | None = None, peer_gguf=None):
    """The peer `name` loaded with the checkpoint, dtype and device of `llm` (llama.cpp: a GGUF of
    the same weights, `peer_gguf` or `source_gguf` re-encoded, same thread count)."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; allowed: {', '.join(PEERS)}")
    cfg = llm.engine.config
    if name == "llama.cpp":
        if cfg.torch_device.type != "cpu":
            raise ValueError("--vs llama.cpp compares on the CPU; run leanlm with --device cpu")
        path = peer_gguf if peer_gguf is not None else peer_gguf_for(llm, source_gguf, gguf_type)
        return LlamaCppPeer(path, threads=torch.get_num_threads())
    return HFPeer(llm.engine.model_path, cfg.torch_dtype, cfg.torch_device)
