"""Replies requested from many threads at once, generated together: the server's engine.

On an engine whose requests can join a running batch (`joins_running_batch`: vLLM), one scheduler
thread hands the engine every waiting reply, up to `max_batch` at once, and each joins the engine's
running batch at its next step (`serve_rows`: vLLM's own scheduler does the continuous batching, each
request with its own steering); a reply that arrives while others generate starts within one engine
step, and a finished one frees its place at once. A request that cannot run (bad steering, a prompt
too long) fails alone.

Otherwise (Hugging Face transformers) the scheduler thread takes up to `max_batch` waiting replies
whenever the engine is free and runs them as one mixed batch (`Engine.stream_batch`: each row its own
steering, sampling, seed and budget), so a new batch forms when the running one ends. Before it starts
a batch that is not full it waits until no request has arrived for `quiet_s` (50 ms) and none is
reading its condition (`exclusive`), at most `gather_s` (250 ms): requests a client sends together
start together (a burst reaches the server over tens of milliseconds, more while a batch is
generating). Replies that arrive while a batch runs wait
for the next one. Why not join rows at every decoding step there? On HF that means splicing KV caches
of different lengths into a running `generate`.

Either way the queue holds at most `max_queue` waiting replies and a request beyond that is refused
(`QueueFull`: the server answers 429 with Retry-After).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from personactl.backends import Engine, Sampling, Steering
from personactl.backends.hf_rows import RowRequest
from personactl.chat.session import TokenStream
from personactl.errors import PersonactlError


class QueueFull(PersonactlError):
    """More replies are waiting than the queue holds."""

    exit_code = 2

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the server is busy: {waiting} requests are waiting", hint=f"retry in about {retry_after} s")
        self.retry_after = retry_after


@dataclass
class _Waiting:
    row: RowRequest
    tokens: TokenStream
    queued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    ended: bool = False

    def finish(self, tokens: list[int]) -> None:
        if not self.ended:
            self.ended = True
            self.tokens.finish(tokens)

    def fail(self, error: BaseException) -> None:
        if not self.ended:
            self.ended = True
            self.tokens.fail(error)


class BatchingChat:
    """A chat backend (`chat.session.ChatBackend`) whose replies run in mixed batches, or join the
    engine's running batch where it can take them (`joins_running_batch`)."""

    def __init__(
        self, engine: Engine, *, max_batch: int = 8, max_queue: int = 64, quiet_s: float = 0.05, gather_s: float = 0.25
    ):
        self.engine = engine
        self.name = engine.name
        self.stop_ids = list(engine.stop_ids)
        self.position_modes = engine.position_modes
        self.max_batch = max(1, min(max_batch, engine.max_stream_batch))
        self.max_queue, self.quiet_s, self.gather_s = max_queue, quiet_s, gather_s
        self._arrived = 0  # requests ever queued: tells the gathering wait that another came
        self._reading = 0  # requests reading their condition now (`exclusive`): about to be queued
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._wake = threading.Condition()
        self._busy = threading.Lock()  # held while a batch runs
        self._closed = False
        self._last_batch_s = 1.0  # the last batch's duration (continuous: the last reply's)
        self.continuous = bool(getattr(engine, "joins_running_batch", False))
        self._in_engine: dict[int, _Waiting] = {}  # continuous: id(row) → reply the engine holds
        self._worker = threading.Thread(target=self._loop, name="personactl-batches", daemon=True)
        self._worker.start()

    def stream(
        self, prompt: list[int], steering: Steering | None, sampling: Sampling, seed: int, stop: threading.Event
    ) -> TokenStream:
        if steering is not None:
            self.engine.check_positions(steering.positions)
        tokens = TokenStream()
        with self._wake:
            self._refuse_when_full()
            waiting = _Waiting(RowRequest(prompt, sampling, seed, tokens.push, stop, steering), tokens)
            waiting.row.on_done = (lambda ids, w=waiting: self._ended(w, ids)) if self.continuous else waiting.finish
            if self._closed:  # nobody takes it any more: interrupted, as the queue's replies at close
                waiting.finish([])
                return tokens
            self._waiting.append(waiting)
            self._arrived += 1
            self._wake.notify()
        return tokens

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Held while no mixed batch runs: a request's condition is read under it, before it joins one
        (the continuous engines read no activations in this process, so nothing reads there). A batch
        being gathered waits for requests in the middle of that reading, and counts the end of one as
        an arrival (`_gather`), so requests sent together still start together."""
        with self._wake:
            self._refuse_when_full()  # at once: not after waiting for the running batch to read
            self._reading += 1
        try:
            with self._busy:
                yield
        finally:
            with self._wake:
                self._reading -= 1
                self._arrived += 1  # its reply is queued next: the quiet period starts again
                self._wake.notify()

    def _refuse_when_full(self) -> None:
        """QueueFull when `max_queue` replies wait already. Called with `_wake` held."""
        if len(self._waiting) >= self.max_queue:
            batches_ahead = len(self._waiting) // self.max_batch + 1
            raise QueueFull(len(self._waiting), max(1, round(batches_ahead * self._last_batch_s)))

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def _loop(self) -> None:
        if self.continuous:
            self._serve()
            return
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            with self._busy:
                self._run(batch)

    def _next_batch(self) -> list[_Waiting] | None:
        with self._wake:
            while not self._waiting and not self._closed:
                self._wake.wait()
            if self._closed:
                return None
            self._gather()
            batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
        return batch

    def _gather(self) -> None:
        """Hold a batch that is not full until requests stop arriving (`quiet_s` without a new one),
        at most `gather_s`: a burst of requests (which reach the server over tens of milliseconds)
        starts together; a lone request waits `quiet_s`. Called with `_wake` held."""
        deadline = time.perf_counter() + self.gather_s
        while len(self._waiting) < self.max_batch and not self._closed:
            seen = self._arrived
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wake.wait(min(self.quiet_s, remaining))
            if self._arrived == seen and not self._reading:
                return

    def _run(self, batch: list[_Waiting]) -> None:
        start = time.perf_counter()
        live = []
        for waiting in batch:
            waiting.tokens.waited_s = start - waiting.queued
            if waiting.row.stop.is_set():  # the client left while it waited
                waiting.finish([])
            else:
                live.append(waiting)
        if not live:
            return
        try:
            results = self.engine.stream_batch([w.row for w in live])
        except BaseException as exc:  # handed to each consumer, which re-raises it in its own thread
            for waiting in live:
                waiting.fail(exc)
            return
        for waiting, tokens in zip(live, results, strict=True):
            waiting.finish(tokens)  # rows end as they finish (`on_done`); this catches any left
        self._last_batch_s = time.perf_counter() - start

    # --- continuous: the engine's loop takes replies between its steps -----------------------------
    def _serve(self) -> None:
        try:
            self.engine.serve_rows(self._take, self._failed, self.max_batch)
        except BaseException as exc:  # the engine's loop broke: no reply may wait for it forever
            self._fail_all(exc)

    def _take(self, block: bool, room: int) -> list[RowRequest] | None:
        """Up to `room` waiting replies for the engine (waiting for one when `block`); None once closed."""
        with self._wake:
            while block and not self._waiting and not self._closed:
                self._wake.wait()
            if self._closed:
                return None
            taken = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            now = time.perf_counter()
            for waiting in taken:
                waiting.started = now
                waiting.tokens.waited_s = now - waiting.queued
                self._in_engine[id(waiting.row)] = waiting
        return [waiting.row for waiting in taken]

    def _ended(self, waiting: _Waiting, tokens: list[int], error: BaseException | None = None) -> None:
        with self._wake:
            self._in_engine.pop(id(waiting.row), None)
            if waiting.started:
                self._last_batch_s = time.perf_counter() - waiting.started
            self._wake.notify_all()  # `idle` waits for the engine to hold none
        if error is None:
            waiting.finish(tokens)
        else:
            waiting.fail(error)

    def _failed(self, row: RowRequest, error: BaseException) -> None:
        with self._wake:
            waiting = self._in_engine.get(id(row))
        if waiting is not None:
            self._ended(waiting, [], error)

    def _fail_all(self, error: BaseException) -> None:
        with self._wake:
            self._closed = True
            replies = [*self._in_engine.values(), *self._waiting]
            self._in_engine, self._waiting = {}, collections.deque()
            self._wake.notify_all()
        for waiting in replies:
            waiting.fail(error)

    def idle(self, timeout: float) -> bool:
        """Wait (bounded) until no batch is running (continuous: the engine holds no reply); True
        when none is."""
        if self.continuous:
            with self._wake:
                return self._wake.wait_for(lambda: not self._in_engine, timeout)
        if self._busy.acquire(timeout=timeout):
            self._busy.release()
            return True
        return False

    def close(self) -> None:
        """Stop taking batches; replies still waiting end as interrupted (empty)."""
        with self._wake:
            self._closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._wake.notify_all()
        for w in waiting:
            w.row.stop.set()
            w.finish([])
