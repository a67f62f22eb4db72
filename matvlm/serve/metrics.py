"""`GET /metrics`: the service's state in Prometheus' text exposition format (version 0.0.4).

Gauges of requests running and waiting, counters of finished requests and generated tokens, and
histograms of time to first token and of each finished request's decode rate (tokens/s).
"""

from __future__ import annotations

import threading
from bisect import bisect_left

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)            # the last one: +Inf
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.buckets, v)] += 1
        self.sum += v

    def lines(self, labels: str) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for le, c in zip([*map(str, self.buckets), "+Inf"], self.counts):
            total += c
            out.append(f'{self.name}_bucket{{{labels},le="{le}"}} {total}')
        out += [f"{self.name}_sum{{{labels}}} {self.sum:.6f}", f"{self.name}_count{{{labels}}} {total}"]
        return out


class Metrics:
    """Reads a service's counts and the outputs it finished since the last read."""

    def __init__(self, service):
        self.service = service
        self.lock = threading.Lock()
        self.ttft = Histogram("matvlm_time_to_first_token_seconds", "time from arrival to the first token",
                              TTFT_BUCKETS)
        self.rate = Histogram("matvlm_request_decode_tokens_per_second",
                              "a finished request's tokens after the first over its decode time", RATE_BUCKETS)
        self.requests = self.tokens = 0

    def _collect(self) -> None:
        with self.service.lock:
            done, self.service.finished[:] = list(self.service.finished), []
        for out in done:
            self.requests += 1
            self.tokens += len(out.token_ids)
            ttft, total = out.timings.get("ttft_s"), out.timings.get("total_s")
            if ttft is not None:
                self.ttft.observe(ttft)
                if total and total > ttft and len(out.token_ids) > 1:
                    self.rate.observe((len(out.token_ids) - 1) / (total - ttft))

    def render(self) -> str:
        with self.lock:
            self._collect()
            running, waiting = self.service.counts()
            labels = f'scheduler="{self.service.scheduler}"'
            lines = ["# HELP matvlm_requests_running requests holding a batch slot",
                     "# TYPE matvlm_requests_running gauge", f"matvlm_requests_running{{{labels}}} {running}",
                     "# HELP matvlm_requests_waiting requests queued for a slot",
                     "# TYPE matvlm_requests_waiting gauge", f"matvlm_requests_waiting{{{labels}}} {waiting}",
                     "# HELP matvlm_requests_finished_total requests answered",
                     "# TYPE matvlm_requests_finished_total counter",
                     f"matvlm_requests_finished_total{{{labels}}} {self.requests}",
                     "# HELP matvlm_generated_tokens_total tokens generated for answered requests",
                     "# TYPE matvlm_generated_tokens_total counter",
                     f"matvlm_generated_tokens_total{{{labels}}} {self.tokens}"]
            lines += self.ttft.lines(labels) + self.rate.lines(labels)
            return "\n".join(lines) + "\n"
