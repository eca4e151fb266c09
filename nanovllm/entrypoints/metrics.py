"""GET /metrics: the engine's state in the Prometheus text format (version 0.0.4), no client library.

Everything is read from the snapshot the engine thread publishes once per loop turn (see
async_engine.py), so a scrape never walks the engine's structures while they change.
"""
from bisect import bisect_left

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class _Writer:

    def __init__(self):
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, samples: list[tuple[dict, float]] | float):
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        if not isinstance(samples, list):
            samples = [({}, samples)]
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_fmt(value)}")

    def histogram(self, name: str, help_text: str, h: Histogram):
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        cumulative = 0
        for bound, n in zip(list(h.buckets) + [float("inf")], h.counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else _fmt(bound)
            self.lines.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        self.lines.append(f"{name}_sum {_fmt(h.sum)}")
        self.lines.append(f"{name}_count {h.count}")


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def render(snapshot: dict, http_errors: dict[int, int] | None = None) -> str:
    """The exposition text for one engine snapshot plus the HTTP side's error counts by status."""
    w = _Writer()
    kv, st = snapshot["kv"], snapshot["stats"]
    w.metric("nanovllm_num_requests_running", "gauge", "Sequences in the running batch.", snapshot["running"])
    w.metric("nanovllm_num_requests_waiting", "gauge", "Sequences queued for admission.", snapshot["waiting"])
    w.metric("nanovllm_live_requests", "gauge", "HTTP requests with unfinished sequences.", snapshot["live_requests"])
    w.metric("nanovllm_kv_blocks_total", "gauge", "KV cache pages in the pool.", kv["blocks_total"])
    w.metric("nanovllm_kv_blocks_used", "gauge", "KV cache pages held by live sequences.", kv["blocks_used"])
    w.metric("nanovllm_kv_blocks_free", "gauge", "KV cache pages free (cached prefixes included).", kv["blocks_free"])
    w.metric("nanovllm_kv_cache_usage_ratio", "gauge", "Share of KV pages in use.",
             kv["blocks_used"] / max(kv["blocks_total"], 1))
    w.metric("nanovllm_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
             kv["cache_hit_tokens"])
    w.metric("nanovllm_prefix_cache_query_tokens_total", "counter", "Prompt tokens looked up in the prefix cache.",
             kv["cache_query_tokens"])
    w.metric("nanovllm_prefix_cache_hit_rate", "gauge", "Hit tokens / query tokens since start.",
             kv["cache_hit_tokens"] / kv["cache_query_tokens"] if kv["cache_query_tokens"] else 0.0)
    w.metric("nanovllm_prompt_tokens_total", "counter", "Prompt tokens of admitted sequences.", st["prompt_tokens"])
    w.metric("nanovllm_generation_tokens_total", "counter", "Tokens generated.", st["generated_tokens"])
    w.metric("nanovllm_steps_total", "counter", "Engine steps by kind.",
             [({"kind": "prefill"}, st["prefill_steps"]), ({"kind": "decode"}, st["decode_steps"])])
    w.metric("nanovllm_cascade_steps_total", "counter", "Steps that ran cascade attention.", st["cascade_steps"])
    w.metric("nanovllm_preemptions_total", "counter", "Sequences preempted for lack of KV pages.",
             snapshot["preemptions"])
    w.metric("nanovllm_max_batch_size", "gauge", "Most sequences one step has run.", st["max_batch_size"])
    w.histogram("nanovllm_step_batch_size", "Sequences that produced a token in one step.",
                snapshot["batch_size_hist"])
    w.histogram("nanovllm_time_to_first_token_seconds", "From request queued to its first token.",
                snapshot["ttft_hist"])
    w.metric("nanovllm_sequences_finished_total", "counter", "Finished sequences by reason.",
             [({"reason": r}, n) for r, n in sorted(snapshot["finished_by_reason"].items())])
    w.metric("nanovllm_http_errors_total", "counter", "Error responses by HTTP status.",
             [({"status": s}, n) for s, n in sorted((http_errors or {}).items())])
    return "\n".join(w.lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """Sample name (with its labels, as written) -> value. For tests and the load generator."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
