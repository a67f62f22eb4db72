"""A thread that owns the engine and batches concurrent requests (the HTTP server's and the web UI's core).

Callers `submit` a request from any thread and iterate its text as it is generated. Two schedulers:

- `ContinuousService` (the default): iteration-level scheduling (`engine.scheduler.ContinuousBatcher`):
  a request joins the running batch at the next decode step and leaves it when done; newcomers'
  prefill is chunked between decode steps, so running streams keep flowing.
- `BatchingService` (static): the worker takes the first waiting request, waits `window_s` for more
  (up to `max_batch`) and runs them as one batch to the end; newcomers wait for the next batch.

Both queue first come first served, at most `max_waiting` requests (`submit` then raises `QueueFull`);
a request's failure (its image, prompt or generation) is its own error, the others finish; a cancelled
request (a client that went away) frees its place. The engine is used by the worker thread only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..engine.engine import Engine, Output, Request, context_limit
from ..engine.scheduler import ContinuousBatcher, Sequence
from ..errors import MatvlmError

_DONE = object()
_STOP = object()       # close(): the worker ends once what it holds is done


class QueueFull(MatvlmError):
    """The service has `max_waiting` requests waiting already."""


@dataclass
class Handle:
    request: Request
    events: "queue.Queue" = field(default_factory=queue.Queue)
    output: Output | None = None
    error: BaseException | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_text_s: float | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _wakers: list = field(default_factory=list)   # (event loop, asyncio.Event) of each async reader

    def put_text(self, text: str) -> None:
        if self.first_text_s is None:
            self.first_text_s = time.perf_counter() - self.submitted
        self.events.put(text)
        self._wake()

    def finish(self, output: Output | None, error: BaseException | None) -> None:
        self.output, self.error = output, error
        self.done.set()
        self.events.put(_DONE)
        self._wake()

    def _wake(self) -> None:
        for loop, event in list(self._wakers):
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:                # that reader's loop has closed: nobody is reading there
                pass

    def cancel(self) -> None:
        """The caller went away: the worker frees its slot (or its place in the queue) at the next step."""
        self.cancelled = True

    def stream(self):
        """Yield text pieces as they are generated; raises the engine's error if the request failed.
        Blocks the calling thread between pieces (`astream` is the event loop's form)."""
        sent = ""
        while True:
            item = self.events.get()
            if item is _DONE:
                break
            if piece := self._new_text(item, sent):
                yield piece
                sent += piece
        if piece := self._rest(sent):
            yield piece

    async def astream(self):
        """`stream` for an asyncio event loop: waits for each piece without holding a thread, so any number
        of streams (running or still queued) cost the server no worker threads."""
        event = self._attach()
        sent = ""
        while True:
            try:
                item = self.events.get_nowait()
            except queue.Empty:
                event.clear()
                if self.events.empty():          # a piece put before clear() is read now, not lost
                    await event.wait()
                continue
            if item is _DONE:
                break
            if piece := self._new_text(item, sent):
                yield piece
                sent += piece
        if piece := self._rest(sent):
            yield piece

    async def aresult(self, gone=None, poll_s: float = 0.25) -> Output:
        """`result` for an asyncio event loop, without holding a thread. `gone`: an async callable polled
        every `poll_s` seconds while waiting (however often tokens arrive); when it returns true the request
        is cancelled."""
        event = self._attach()
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + poll_s
        while not self.done.is_set():
            event.clear()
            if self.done.is_set():
                break
            try:
                await asyncio.wait_for(event.wait(), max(0.0, next_poll - loop.time()))
            except asyncio.TimeoutError:
                pass
            if loop.time() >= next_poll and not self.done.is_set():
                next_poll = loop.time() + poll_s
                if gone is not None and await gone():
                    self.cancel()
        return self.result(0)

    def _attach(self) -> asyncio.Event:
        event = asyncio.Event()
        self._wakers.append((asyncio.get_running_loop(), event))
        return event

    @staticmethod
    def _new_text(item: str, sent: str) -> str:
        """What the answer so far (`item`) adds to the text already sent ('' if nothing)."""
        text = item.rstrip("\ufffd")            # a character whose bytes are still arriving waits
        return text[len(sent):] if text.startswith(sent) else ""

    def _rest(self, sent: str) -> str:
        """After the last piece: the final answer's text not yet sent; raises the request's error."""
        if self.error is not None:
            raise self.error
        if self.output is not None and self.output.text.startswith(sent):
            return self.output.text[len(sent):]
        return ""

    def result(self, timeout: float | None = None) -> Output:
        """Wait for the whole answer (any number of callers may wait; `stream` has one reader); raises
        the request's error, or TimeoutError after `timeout` seconds."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"no answer within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.output


class Service:
    """The queue, the worker thread and the counters both schedulers share."""

    scheduler = ""

    def __init__(self, engine: Engine, max_batch: int, max_waiting: int):
        self.engine, self.max_batch, self.max_waiting = engine, max_batch, max_waiting
        self.pending: "queue.Queue[Handle]" = queue.Queue()
        self.lock = threading.Lock()
        self.running = 0                 # static: requests of the batch that runs
        self.finished: list[Output] = []   # kept short: the metrics read and clear it
        self.thread = threading.Thread(target=self._loop, name="matvlm-engine", daemon=True)
        self.thread.start()

    @property
    def max_len(self) -> int | None:
        """Tokens (prompt + answer) one request may hold: the model's context."""
        return context_limit(self.engine.model)

    def counts(self) -> tuple[int, int]:
        """(requests running, requests waiting)."""
        return self.running, self.pending.qsize()

    def submit(self, request: Request) -> Handle:
        """Queue `request` (its seed fixed now when it has none, so a retry draws the same tokens)."""
        if request.params.seed is None:
            seed = int(torch.randint(0, 2 ** 31 - 1, ()))
            request = dataclasses.replace(request, params=dataclasses.replace(request.params, seed=seed))
        handle = Handle(request)
        with self.lock:
            waiting = self.counts()[1]
            if waiting >= self.max_waiting:
                raise QueueFull(f"{waiting} requests are waiting already (the most this server queues is "
                                f"{self.max_waiting}); retry later")
            self.pending.put(handle)
        return handle

    def _started(self, n: int) -> None:
        with self.lock:
            self.running += n

    def _ended(self, handle: Handle, output: Output | None, error: BaseException | None) -> None:
        with self.lock:
            self.running = max(0, self.running - 1)
            if output is not None:
                self.finished.append(output)
                del self.finished[:-1000]
        handle.finish(output, error)

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop the worker once the requests it holds are answered (it frees its state with it)."""
        self.pending.put(_STOP)
        self.thread.join(timeout)

    def _loop(self) -> None:
        raise NotImplementedError


class BatchingService(Service):
    """Static batching: one batch runs to its end before the next starts."""

    scheduler = "static"

    def __init__(self, engine: Engine, max_batch: int = 16, window_s: float = 0.01, max_waiting: int = 256):
        self.window_s = window_s
        super().__init__(engine, max_batch, max_waiting)

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self.pending.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    h = self.pending.get(timeout=self.window_s)
                except queue.Empty:
                    break
                if h is _STOP:
                    stop = True
                    break
                batch.append(h)
            self._started(len(batch))
            with torch.no_grad():
                self._run_isolated(batch)

    def _ended(self, handle: Handle, output: Output | None, error: BaseException | None) -> None:
        if output is not None:         # the engine times the batch; a request's clock starts at its arrival
            total = time.perf_counter() - handle.submitted
            first = handle.first_text_s if handle.first_text_s is not None else total
            output = dataclasses.replace(output, timings={**output.timings, "ttft_s": first, "total_s": total,
                                                          "scheduler": "static"})
        super()._ended(handle, output, error)

    def _run_isolated(self, batch: list[Handle]) -> None:
        """Encode each request alone (a bad image or prompt fails only its own), run the rest as one batch;
        if the batch fails, run each of its requests alone, so each gets its own answer or error."""
        ready, encoded = [], []
        for h in batch:
            if h.cancelled:
                self._ended(h, None, MatvlmError("request cancelled"))
                continue
            try:
                encoded.append(self.engine.encode(h.request))
                ready.append(h)
            except Exception as e:                # noqa: BLE001 - this request's own error
                self._ended(h, None, e)
        if not ready:
            return
        try:
            outs = self._run_batch(ready, encoded)
        except Exception as e:                    # noqa: BLE001
            if len(ready) == 1:
                self._ended(ready[0], None, e)
                return
            for h, enc in zip(ready, encoded):
                try:
                    outs = self._run_batch([h], [enc])
                    self._ended(h, outs[0], None)
                except Exception as e1:          # noqa: BLE001
                    self._ended(h, None, e1)
            return
        for h, out in zip(ready, outs):
            self._ended(h, out, None)

    def _run_batch(self, batch: list[Handle], encoded: list) -> list[Output]:
        for event in self.engine._run([h.request for h in batch], stream=True, encoded=encoded):
            if isinstance(event[0], str):                 # after each step: the text so far
                for h, text in zip(batch, event):
                    h.put_text(text)
            else:                                         # the end: the outputs
                return event


class ContinuousService(Service):
    """Continuous batching over `max_batch` slots of up to `max_len` tokens (default: the model's context,
    capped to what fits in free memory: `engine.scheduler.slot_length`)."""

    scheduler = "continuous"

    @property
    def max_len(self) -> int:
        """Tokens (prompt + answer) one request may hold: a slot's size."""
        return self.batcher.pool.length

    def __init__(self, engine: Engine, max_batch: int = 16, max_waiting: int = 256, max_len: int | None = None,
                 prefill_tokens: int = 1024, warm_up: bool = True, overlap_prefill: bool | None = None):
        # prefills overlap decoding by default on CUDA, where an admission is mostly host work (docs/benchmarks.md)
        overlap = engine.device.type == "cuda" if overlap_prefill is None else overlap_prefill
        self.batcher = ContinuousBatcher(engine, slots=max_batch, length=max_len, prefill_tokens=prefill_tokens,
                                         overlap=overlap)
        # before serving: kernel compilation and CUDA-graph capture (tens of seconds on a GPU the first
        # time) are paid here, not by the first requests
        self.warm_up_s = self.batcher.warm_up() if warm_up else None
        super().__init__(engine, max_batch, max_waiting)

    def _loop(self) -> None:
        b, stop = self.batcher, False
        while not (stop and not b.busy):
            if not b.busy and not stop:
                h = self.pending.get()
                if h is _STOP:
                    return
                self._add(h)
            while True:
                try:
                    h = self.pending.get_nowait()
                except queue.Empty:
                    break
                if h is _STOP:
                    stop = True
                else:
                    self._add(h)
            b.step()

    def close(self, timeout: float | None = 60.0) -> None:
        super().close(timeout)
        if not self.thread.is_alive():                  # still serving past the timeout: its prefill thread stays
            self.batcher.close()

    def _add(self, h: Handle) -> None:
        def finish(output, error):
            self._ended(h, output, error)

        self.batcher.add(Sequence(h.request, emit=h.put_text, finish=finish, cancelled=lambda: h.cancelled,
                                  arrived=h.submitted))

    def counts(self) -> tuple[int, int]:
        return self.batcher.n_running, self.pending.qsize() + len(self.batcher.waiting)
