"""``/metrics``: the server's counters, gauges and histograms in Prometheus' text format (version 0.0.4),
written out here (no client library). Names follow vLLM's (``vllm:`` becomes ``lorakit:``), so its
dashboards carry over; every count is labelled with the request's ``model_name``: an adapter, or the
base model's name.

Counters and histograms change on the event loop only, where ``/metrics`` also reads them; gauges read
the engine's state when scraped.
"""

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["CONTENT_TYPE", "Counter", "Gauge", "Histogram", "RequestMetrics", "GenerationMetrics", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Sample = tuple[str, tuple[tuple[str, str], ...], float]  # (name, labels, value)


class Counter:
    """A count that only grows, one per combination of values of ``labels``."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.labels = name, help, labels
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(str(labels[k]) for k in self.labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def samples(self) -> Iterator[Sample]:
        for key, value in self.values.items():
            yield self.name, tuple(zip(self.labels, key)), value


class Gauge:
    """A value read when scraped (``kind="counter"`` for a count the engine keeps itself)."""

    def __init__(self, name: str, help: str, read: Callable[[], float], kind: str = "gauge") -> None:
        self.name, self.help, self.read, self.kind = name, help, read, kind

    def samples(self) -> Iterator[Sample]:
        yield self.name, (), float(self.read())


class Histogram:
    """Observations counted into cumulative buckets (``le``: at most that value), with their count and sum."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)
        self.count, self.sum = 0, 0.0

    def observe(self, value: float, times: int = 1) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += times
        self.count += times
        self.sum += value * times

    def samples(self) -> Iterator[Sample]:
        for bound, count in zip(self.buckets, self.counts):
            yield f"{self.name}_bucket", (("le", _number(bound)),), count
        yield f"{self.name}_bucket", (("le", "+Inf"),), self.count
        yield f"{self.name}_sum", (), self.sum
        yield f"{self.name}_count", (), self.count


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


def _escape(text: str, quote: bool = True) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quote else text


def render(metrics: Iterable[Counter | Gauge | Histogram]) -> str:
    """The text format: per metric a ``# HELP`` and a ``# TYPE`` line, then its samples."""
    lines = []
    for m in metrics:
        lines += [f"# HELP {m.name} {_escape(m.help, quote=False)}", f"# TYPE {m.name} {m.kind}"]
        for name, labels, value in m.samples():
            shown = "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}" if labels else ""
            lines.append(f"{name}{shown} {_number(value)}")
    return "\n".join(lines) + "\n"


class RequestMetrics:
    """What both APIs count: requests and their prompt tokens per model, the queue."""

    def __init__(self, waiting: Callable[[], int], adapters: Callable[[], int]) -> None:
        model = ("model_name",)
        self.requests = Counter("lorakit:requests_total", "Requests accepted (generation: queued; classification: "
                                "answered), by model: an adapter or the base", model)
        self.prompt_tokens = Counter("lorakit:prompt_tokens_total", "Prompt (input) tokens of the requests accepted", model)
        self.gauges = [Gauge("lorakit:num_requests_waiting", "Queued, not yet running", waiting),
                       Gauge("lorakit:num_adapters", "Adapters loaded", adapters)]

    def request(self, model: str, prompt_tokens: int) -> None:
        self.requests.inc(model_name=model)
        self.prompt_tokens.inc(prompt_tokens, model_name=model)

    def all(self) -> list[Counter | Gauge | Histogram]:
        return [self.requests, self.prompt_tokens, *self.gauges]

    def render(self) -> str:
        return render(self.all())


# Seconds. Time to first token on a CPU: a prefill of up to a few thousand tokens, behind a queue.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class GenerationMetrics(RequestMetrics):
    """Completions also count their generated tokens, how they ended, their latencies and the running rows.

    Latencies are timed when a completion's text goes out (stamped on the scheduler's thread): time to first
    token from the request to its first text (or its end); inter-token latency, the time between two events
    shared by the tokens the later one carries. A token whose text is held back (half a character, the start
    of a possible stop string) is timed with the text it comes out with, as a streaming client sees it."""

    def __init__(self, waiting: Callable[[], int], adapters: Callable[[], int], running: Callable[[], int],
                 prefix: Callable[[], Any] | None = None) -> None:
        super().__init__(waiting, adapters)
        self.gauges.insert(0, Gauge("lorakit:num_requests_running", "Completions decoding or prefilling (rows)", running))
        if prefix is not None:  # the scheduler's PrefixCache (read when scraped: the engine may replace it)
            self.gauges += [
                Gauge("lorakit:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache",
                      lambda: prefix().queries, kind="counter"),
                Gauge("lorakit:prefix_cache_hits_total", "Prompt tokens whose keys and values came from the prefix "
                      "cache (not prefilled)", lambda: prefix().hits, kind="counter"),
                Gauge("lorakit:prefix_cache_tokens", "Tokens held in the prefix cache", lambda: prefix().tokens)]
        self.generation_tokens = Counter("lorakit:generation_tokens_total", "Tokens generated (a final EOS included)",
                                         ("model_name",))
        self.finished = Counter("lorakit:request_success_total", "Completions ended, by finish reason (stop, length, "
                                "error)", ("model_name", "finished_reason"))
        self.first_token = Histogram("lorakit:time_to_first_token_seconds", "From the request to a completion's first "
                                     "text", TTFT_BUCKETS)
        self.inter_token = Histogram("lorakit:inter_token_latency_seconds", "Between two tokens of a completion, as its "
                                     "text goes out", ITL_BUCKETS)

    def all(self) -> list[Counter | Gauge | Histogram]:
        return [*super().all(), self.generation_tokens, self.finished, self.first_token, self.inter_token]
