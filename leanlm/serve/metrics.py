"""Prometheus metrics for the server, with vLLM's names under a `leanlm:` prefix.

Each app gets its own CollectorRegistry, so several servers (or tests) in one process do not
clash. Load gauges are read from the engine's stats snapshot at scrape time; counters and
histograms are fed by the request handlers when a request ends.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from leanlm.engine.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets: requests range from milliseconds (tiny models) to many minutes
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
TPOT_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
E2E_BUCKETS = [0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
               40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


class _EngineCollector:
    """Gauges (and the engine's own cumulative counters) from AsyncLLM.stats() per scrape."""

    def __init__(self, async_llm, model_name: str):
        self.llm, self.model_name = async_llm, model_name

    def collect(self):
        s = self.llm.stats()
        labels, values = ["model_name"], [self.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(values, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(values, value)
            return c

        blocks = s.kv_blocks_used + s.kv_blocks_free
        yield gauge("leanlm:num_requests_running", "Sequences in the running batch (n>1 counts n).",
                    s.num_running)
        yield gauge("leanlm:num_requests_waiting", "Sequences waiting to be scheduled (new or preempted).",
                    s.num_waiting)
        yield gauge("leanlm:kv_blocks_used", "KV-cache blocks referenced by a sequence.", s.kv_blocks_used)
        yield gauge("leanlm:kv_blocks_free", "KV-cache blocks allocatable now.", s.kv_blocks_free)
        yield gauge("leanlm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0..1).",
                    s.kv_blocks_used / blocks if blocks else 0.0)
        yield gauge("leanlm:prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up "
                    "(cumulative).", s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0)
        yield counter("leanlm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries)
        yield counter("leanlm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      s.prefix_cache_hits)
        yield counter("leanlm:num_preemptions", "Sequences preempted for recomputation.", s.num_preemptions)
        if s.spec is not None:  # speculative decoding, labelled with its proposer's spec
            yield from _spec_metrics(s.spec, self.model_name)


def _spec_metrics(spec, model_name: str):
    """SpecStats as metric families, labelled with the proposer's spec. The proposer-specific
    families (exit layer, per-layer acceptance) are early-exit:auto's: absent under the others."""
    for m in _spec_families(spec, model_name):
        if m is not None:
            yield m


def _spec_families(spec, model_name: str):
    labels, values = ["model_name", "spec"], [model_name, spec.spec]

    def family(kind, name, doc, value=None, by=None, samples=()):
        """One family; `by` names a further label and `samples` its (label value, value) pairs
        (none yet: no family, rather than a HELP line without samples)."""
        m = kind(f"leanlm:{name}", doc, labels=labels + ([by] if by else []))
        if by is None:
            m.add_metric(values, value)
        for key, v in samples:
            m.add_metric(values + [str(key)], v)
        return m if m.samples else None

    C, G = CounterMetricFamily, GaugeMetricFamily
    yield family(C, "spec_decode_num_draft_tokens", "Draft tokens proposed and verified.", spec.drafted)
    yield family(C, "spec_decode_num_accepted_tokens", "Draft tokens accepted.", spec.accepted)
    yield family(C, "spec_decode_num_verifications", "Sequence steps that verified a draft.", spec.verifications)
    yield family(C, "spec_decode_num_target_forwards", "Target model forward passes (engine steps).",
                 spec.target_forwards)
    yield family(G, "spec_decode_draft_acceptance_rate", "Accepted / drafted tokens (cumulative).",
                 spec.acceptance_rate)
    yield family(G, "spec_decode_mean_accepted_length", "Tokens emitted per verification (accepted drafts "
                 "+ 1, cumulative).", spec.mean_accepted_len)
    yield family(G, "spec_decode_token_cost", "The cost model's beta: each further token in a forward "
                 "relative to a one-token forward (measured at load).", spec.token_cost)
    yield family(G, "spec_decode_draft_cost", "A draft model's one-token step relative to the target's "
                 "(measured at load; 0 without a draft model).", spec.draft_cost)
    yield family(G, "spec_decode_acceptance_estimate", "Running acceptance rate (decayed over ~50 recent "
                 "drafts) with which the fixed proposers choose their draft length.", spec.acceptance_estimate)
    yield family(C, "spec_decode_num_drafting_off_steps", "Steps with decoding sequences in which nobody "
                 "drafted: reason=batch_cap (more decoding sequences than spec_max_batch), reason=cost_model "
                 "(no draft length predicted to pay).", by="reason",
                 samples=[("batch_cap", spec.off_batch), ("cost_model", spec.off_cost)])
    yield family(C, "spec_decode_num_steps_by_draft_length", "Steps by the draft length the policy chose "
                 "(the most any sequence drafts; 0: drafting off by the cost model).", by="draft_length",
                 samples=sorted(spec.draft_lengths.items()))
    yield family(G, "spec_decode_draft_length", "The draft length chosen at the latest step (0: off).",
                 spec.draft_length)
    yield family(C, "spec_decode_num_steps_by_exit_layer", "early-exit:auto: steps by the exit layer chosen "
                 "(layers the draft runs; 0: drafting off).", by="exit_layer", samples=sorted(spec.exit_layers.items()))
    if spec.exit_layers:  # early-exit:auto
        yield family(G, "spec_decode_exit_layer", "early-exit:auto: the exit layer chosen at the latest step "
                     "(0: off).", spec.exit_layer)
    yield family(G, "spec_decode_layer_acceptance_estimate", "early-exit:auto: each candidate exit layer's "
                 "acceptance estimate from shadow tokens (decayed over ~100 recent positions).", by="layer",
                 samples=sorted(spec.layer_acceptance.items()))


class ServerMetrics:
    def __init__(self, async_llm, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.prompt_tokens = Counter("leanlm:prompt_tokens", "Prompt tokens of finished requests.",
                                     labels, registry=r)
        self.generation_tokens = Counter("leanlm:generation_tokens", "Generated tokens.", labels, registry=r)
        self.request_success = Counter(
            "leanlm:request_success", "Finished sequences (choices) by finish reason; 'abort' for a "
            "client that went away.", labels + ["finished_reason"], registry=r)
        self.ttft = Histogram("leanlm:time_to_first_token_seconds", "Arrival to first output token.",
                              labels, buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("leanlm:time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.",
                              labels, buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("leanlm:e2e_request_latency_seconds", "Arrival to last output token.",
                             labels, buckets=E2E_BUCKETS, registry=r)
        r.register(_EngineCollector(async_llm, model_name))

    def observe(self, last: RequestOutput | None, aborted: bool) -> None:
        """Record one request that ended; `last` is its latest output (None if it had none)."""
        m = self.model_name
        if last is None:
            self.request_success.labels(m, "abort").inc()
            return
        self.prompt_tokens.labels(m).inc(len(last.prompt_token_ids))
        generated = [len(o.token_ids) for o in last.outputs]
        self.generation_tokens.labels(m).inc(sum(generated))
        for o in last.outputs:
            reason = "abort" if aborted and not o.finished else (o.finish_reason or "abort")
            self.request_success.labels(m, reason).inc()
        t = last.metrics
        if t is None or t.first_token_time is None:
            return
        end = t.finished_time or time.time()
        self.ttft.labels(m).observe(t.first_token_time - t.arrival_time)
        self.e2e.labels(m).observe(end - t.arrival_time)
        if max(generated) > 1:
            self.tpot.labels(m).observe((end - t.first_token_time) / (max(generated) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
