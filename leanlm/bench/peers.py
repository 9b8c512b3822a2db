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

PEERS = ("hf",)


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


def make_peer(name: str, llm):
    """The peer `name` loaded with the checkpoint, dtype and device of `llm`."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; allowed: {', '.join(PEERS)}")
    cfg = llm.engine.config
    return HFPeer(llm.engine.model_path, cfg.torch_dtype, cfg.torch_device)
