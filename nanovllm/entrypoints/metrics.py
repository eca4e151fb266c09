"""GET /metrics: the engine's state in the Prometheus text format, written by prometheus-client.

Everything is read from the snapshot the engine thread publishes once per loop turn (see
async_engine.py), so a scrape never walks the engine's structures while they change.
"""
from bisect import bisect_left

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Histogram:
    """Cumulative-bucket histogram as Prometheus wants it; observed by one thread, copied for readers."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float):
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def copy(self) -> "Histogram":
        h = Histogram(self.buckets)
        h.counts, h.sum, h.count = list(self.counts), self.sum, self.count
        return h


class _SnapshotCollector:
    """prometheus-client's view of one engine snapshot: every family built at scrape time."""

    def __init__(self, snapshot: dict, http_errors: dict[int, int]):
        self.snapshot, self.http_errors = snapshot, http_errors

    def collect(self):
        snap = self.snapshot
        kv, st = snap["kv"], snap["stats"]

        def gauge(name, text, value):
            return GaugeMetricFamily(name, text, value=value)

        def counter(name, text, value=None, label=None, samples=()):
            family = CounterMetricFamily(name, text, value=value, labels=[label] if label else None)
            for key, n in samples:
                family.add_metric([str(key)], n)
            return family

        def histogram(name, text, h: Histogram):
            cumulative, buckets = 0, []
            for bound, n in zip(list(h.buckets) + [float("inf")], h.counts):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else floatToGoString(bound), cumulative))
            return HistogramMetricFamily(name, text, buckets=buckets, sum_value=h.sum)

        yield gauge("nanovllm_num_requests_running", "Sequences in the running batch.", snap["running"])
        yield gauge("nanovllm_num_requests_waiting", "Sequences queued for admission.", snap["waiting"])
        yield gauge("nanovllm_live_requests", "HTTP requests with unfinished sequences.", snap["live_requests"])
        yield gauge("nanovllm_kv_blocks_total", "KV cache pages in the pool.", kv["blocks_total"])
        yield gauge("nanovllm_kv_blocks_used", "KV cache pages held by live sequences.", kv["blocks_used"])
        yield gauge("nanovllm_kv_blocks_free", "KV cache pages free (cached prefixes included).", kv["blocks_free"])
        yield gauge("nanovllm_kv_cache_usage_ratio", "Share of KV pages in use.",
                    kv["blocks_used"] / max(kv["blocks_total"], 1))
        yield counter("nanovllm_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
                      kv["cache_hit_tokens"])
        yield counter("nanovllm_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache.",
                      kv["cache_query_tokens"])
        yield gauge("nanovllm_prefix_cache_hit_rate", "Hit tokens / query tokens since start.",
                    kv["cache_hit_tokens"] / kv["cache_query_tokens"] if kv["cache_query_tokens"] else 0.0)
        yield gauge("nanovllm_kv_host_blocks_total", "KV pages of the host-memory tier (0: off).",
                    kv.get("host_blocks_total", 0))
        yield gauge("nanovllm_kv_host_blocks_used", "Host-tier pages holding an evicted prefix.",
                    kv.get("host_blocks_used", 0))
        yield counter("nanovllm_kv_host_bytes_copied", "KV bytes copied between the GPU and the host tier.",
                      label="direction", samples=[("to_host", kv.get("bytes_to_host", 0)),
                                                  ("from_host", kv.get("bytes_from_host", 0))])
        yield counter("nanovllm_kv_host_hit_tokens", "Prompt tokens restored from the host tier.",
                      kv.get("host_hit_tokens", 0))
        yield counter("nanovllm_kv_copy_seconds", "Device time of host-tier copies (write-backs and restores).",
                      st.get("copy_seconds", 0.0))
        yield counter("nanovllm_kv_copy_steps", "Steps that copied pages to or from the host tier.",
                      st.get("copy_steps", 0))
        yield gauge("nanovllm_kv_restore_latency_seconds", "Mean device time of a step's host-tier copies.",
                    st.get("copy_seconds", 0.0) / st["copy_steps"] if st.get("copy_steps") else 0.0)
        yield counter("nanovllm_prompt_tokens", "Prompt tokens of admitted sequences.", st["prompt_tokens"])
        yield counter("nanovllm_generation_tokens", "Tokens generated.", st["generated_tokens"])
        yield counter("nanovllm_steps", "Engine steps by kind.", label="kind",
                      samples=[("prefill", st["prefill_steps"]), ("decode", st["decode_steps"])])
        yield counter("nanovllm_cascade_steps", "Steps that ran cascade attention.", st["cascade_steps"])
        yield counter("nanovllm_preemptions", "Sequences preempted for lack of KV pages.", snap["preemptions"])
        yield gauge("nanovllm_max_queue_wait_seconds", "Longest wait of a request from arrival to admission.",
                    snap.get("max_queue_wait_s", 0.0))
        yield gauge("nanovllm_max_batch_size", "Most sequences one step has run.", st["max_batch_size"])
        yield histogram("nanovllm_step_batch_size", "Sequences that produced a token in one step.",
                        snap["batch_size_hist"])
        yield histogram("nanovllm_time_to_first_token_seconds", "From request queued to its first token.",
                        snap["ttft_hist"])
        yield counter("nanovllm_sequences_finished", "Finished sequences by reason.", label="reason",
                      samples=sorted(snap["finished_by_reason"].items()))
        yield counter("nanovllm_http_errors", "Error responses by HTTP status.", label="status",
                      samples=sorted(self.http_errors.items()))


def render(snapshot: dict, http_errors: dict[int, int] | None = None) -> str:
    """The exposition text for one engine snapshot plus the HTTP side's error counts by status."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot, http_errors or {}))
    return generate_latest(registry).decode()


def parse(text: str) -> dict[str, float]:
    """Sample name (with its labels, as written) -> value. For tests and the load generator."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
