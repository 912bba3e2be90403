"""Rows of a mixed batch, generated in one vLLM engine run and streamed to each row as they come.

`step_rows` adds every row's request to vLLM's `LLMEngine` (each with its own sampling, seed,
budget and steering configuration, see `vllm.VLLMBackend.stream_batch`), then steps the engine:
vLLM's scheduler batches the requests continuously, and each step's new tokens (DELTA outputs) go
to their row's `on_token`. A row whose `stop` is set is aborted in the engine and gets no token
after that; a row ends (`on_done`) as soon as its request finishes, not when the whole batch does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from personactl.backends.hf_rows import RowRequest

# (request id, rendered prompt, SamplingParams with output_kind DELTA)
EngineRequest = tuple[str, Any, Any]


class _Flight:
    """The rows of one engine run: their tokens so far and which have ended."""

    def __init__(self, rows: Sequence[RowRequest], request_ids: Sequence[str]):
        self.rows = rows
        self.ids = list(request_ids)
        self.index = {request_id: i for i, request_id in enumerate(self.ids)}
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.done = [False] * len(rows)

    def open_ids(self) -> list[str]:
        return [request_id for request_id, done in zip(self.ids, self.done, strict=True) if not done]

    def end(self, i: int) -> None:
        if not self.done[i]:
            self.done[i] = True
            self.rows[i].on_done(self.tokens[i])

    def abort_stopped(self, engine: Any) -> None:
        """Abort the requests of rows whose `stop` is set; they end with the tokens they have."""
        stopped = [i for i, row in enumerate(self.rows) if not self.done[i] and row.stop.is_set()]
        if stopped:
            engine.abort_request([self.ids[i] for i in stopped])
            for i in stopped:
                self.end(i)

    def take(self, output: Any) -> None:
        """One step's output for one request: hand its new tokens to the row; end it if finished."""
        i = self.index.get(output.request_id)
        if i is None or self.done[i]:
            return
        row = self.rows[i]
        for token in output.outputs[0].token_ids:
            self.tokens[i].append(int(token))
            row.on_token(int(token))
        if output.finished:
            self.end(i)


def step_rows(engine: Any, requests: Sequence[EngineRequest], rows: Sequence[RowRequest]) -> list[list[int]]:
    """Generate `requests` (one per row, same order) in one engine run; returns each row's tokens
    (its end-of-turn token included). Nothing else may use the engine meanwhile; on an error every
    request still open is aborted before the error propagates."""
    flight = _Flight(rows, [request_id for request_id, _, _ in requests])
    added: list[str] = []
    try:
        for request_id, prompt, params in requests:
            engine.add_request(request_id, prompt, params)
            added.append(request_id)
        while True:
            flight.abort_stopped(engine)
            if all(flight.done) or not engine.has_unfinished_requests():
                break  # (a step with nothing left to run would wait for output forever)
            for output in engine.step():
                flight.take(output)
    except BaseException:
        open_ids = set(flight.open_ids())
        engine.abort_request([request_id for request_id in added if request_id in open_ids])
        raise
    for i in range(len(rows)):
        flight.end(i)
    return flight.tokens
