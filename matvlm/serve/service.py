"""A thread that owns the engine and batches concurrent requests (the HTTP server's and the web UI's core).

Callers `submit` a request from any thread and iterate its text as it is generated. The worker takes
the first waiting request, waits `window_s` for more (up to `max_batch`), and runs them as one batch;
every decode step hands each request its new text. The engine itself is used by this thread only.
"""

from __future__ import annotations

import queue
import threading

import torch
from dataclasses import dataclass, field

from ..engine.engine import Engine, Output, Request

_DONE = object()


@dataclass
class Handle:
    request: Request
    events: "queue.Queue" = field(default_factory=queue.Queue)
    output: Output | None = None
    error: BaseException | None = None

    def stream(self):
        """Yield text pieces as they are generated; raises the engine's error if the request failed."""
        sent = ""
        while True:
            item = self.events.get()
            if item is _DONE:
                break
            text = item.rstrip("\ufffd")        # a character whose bytes are still arriving waits
            if text.startswith(sent) and len(text) > len(sent):
                yield text[len(sent):]
                sent = text
        if self.error is not None:
            raise self.error
        if self.output is not None and self.output.text.startswith(sent) and len(self.output.text) > len(sent):
            yield self.output.text[len(sent):]

    def result(self) -> Output:
        for _ in self.stream():
            pass
        return self.output


class BatchingService:
    def __init__(self, engine: Engine, max_batch: int = 16, window_s: float = 0.01):
        self.engine, self.max_batch, self.window_s = engine, max_batch, window_s
        self.pending: "queue.Queue[Handle]" = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="matvlm-engine", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> Handle:
        handle = Handle(request)
        self.pending.put(handle)
        return handle

    def _loop(self) -> None:
        while True:
            batch = [self.pending.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.pending.get(timeout=self.window_s))
                except queue.Empty:
                    break
            try:
                with torch.no_grad():
                    self._run_batch(batch)
            except BaseException as e:            # noqa: BLE001 - delivered to every waiting caller
                for h in batch:
                    h.error = e
            finally:
                for h in batch:
                    h.events.put(_DONE)

    def _run_batch(self, batch: list[Handle]) -> None:
        for event in self.engine._run([h.request for h in batch], stream=True):
            if isinstance(event[0], str):                 # after each step: the text so far
                for h, text in zip(batch, event):
                    h.events.put(text)
            else:                                         # the end: the outputs
                for h, out in zip(batch, event):
                    h.output = out
