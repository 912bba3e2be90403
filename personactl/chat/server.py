"""An OpenAI-compatible HTTP server for a steered model: `/v1/chat/completions` and `/v1/models`.

Each request becomes a one-turn `ChatSession` carrying that request's steering (persona, α, layers,
positions, norm, and a steering plan: `steer`, a list of `--steer` specs; the command line gives
the defaults), so validation, chat templating, streaming and finish reasons are exactly the chat's.
Plan terms are resolved once per (spec, norm, position, aggregator) and vector-file version, and so
is a condition (`when`, a `--when` spec; `--when` gives the default, null drops it): a request's
prompt projection is read before it joins a batch (`ChatSession.read_condition`, while no batch
runs), and a request below the threshold becomes an unsteered row.
Requests that arrive together are generated together when the engine can mix rows
(`chat.batching.BatchingChat`: each row its own steering, plan, sampling and seed; in float32 a
reply equals the same request alone); an engine that cannot mix rows runs them one at a time
(`Engine.max_stream_batch`).

The transport is FastAPI on uvicorn; request bodies are checked against `ChatRequest` (unknown keys
refused by name); streamed replies are server-sent events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import socket
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from personactl.backends import Sampling, check_plan_ops, engine_for
from personactl.chat.batching import BatchingChat, QueueFull
from personactl.chat.session import ChatSession, TurnStream
from personactl.core.ranges import parse_ranges
from personactl.core.steer_plan import parse_term
from personactl.errors import InputError, ModelError, PersonactlError, VectorFileError
from personactl.steps.condition import Condition, check_condition, resolve_condition
from personactl.steps.plan import ResolvedTerm, resolve_plan
from personactl.store.vectors import LoadedVector, load_for_model

if TYPE_CHECKING:
    from personactl.model.loading import ModelHandle
    from personactl.store.workspace import Workspace

MAX_BODY = 8 << 20
MAX_TERMS = 256  # resolved plan terms kept (the least recently used dropped first)
# errors a reply's generation may raise about what the request asked (after it was queued): 400, not 500
REQUEST_ERRORS = (InputError, ModelError, VectorFileError)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (a hostname other than localhost counts as exposed)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class APIError(Exception):
    """An error answered as OpenAI's JSON error object with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        hint: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.hint = status, message, code, param, hint
        self.retry_after = retry_after  # seconds, for 429 (sent as the Retry-After header)

    def body(self) -> dict[str, Any]:
        kinds = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
        kind = kinds.get(self.status, "invalid_request_error")
        if self.status >= 500:
            kind = "server_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        if self.hint:
            error["hint"] = self.hint
        return {"error": error}


@dataclass(frozen=True)
class ServeDefaults:
    """Steering and sampling for requests that do not say otherwise (the command line's values)."""

    vector: str | None  # None: no default persona (requests steer by their plan, or name one)
    layers: list[int]
    alpha: float = 1.0
    max_alpha: float = 3.0
    positions: str = "all"
    norm: str = "raw"
    position: str = "response_avg"
    aggregator: str = "mean_diff"
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    plan: tuple[str, ...] = ()  # `--steer` specs: the plan of requests that send no `steer`
    when: str | None = None  # `--when` spec: the condition of requests that send no `when`


@dataclass
class Completion:
    """One accepted request: its session (whose steering is fixed) and the reply being generated."""

    id: str
    created: int
    stream: TurnStream
    session: ChatSession
    include_usage: bool = False
    started: float = field(default_factory=time.perf_counter)


class ChatRequest(BaseModel):
    """The keys a chat-completion body may hold: OpenAI's that personactl reads or refuses with a
    reason, and personactl's steering keys. Any other key is refused by name (a typo must not pass
    silently as "no steering"). Values are checked by `SteeredEngine`, which words the errors."""

    model_config = ConfigDict(extra="forbid")

    model: Any = None
    messages: Any = None
    stream: Any = None
    stream_options: Any = None
    max_tokens: Any = None
    max_completion_tokens: Any = None
    temperature: Any = None
    top_p: Any = None
    seed: Any = None
    user: Any = None  # an end-user id: accepted, not used
    # OpenAI's, refused unless left at their defaults
    n: Any = None
    stop: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    response_format: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    # personactl's steering
    persona: Any = None
    alpha: Any = None
    layers: Any = None
    positions: Any = None
    norm: Any = None
    position: Any = None
    aggregator: Any = None
    steer: Any = None  # a steering plan: a list of `--steer` specs ([] = none)
    when: Any = None  # a condition: a `--when` spec (null = none)


def check_keys(body: Mapping[str, Any]) -> None:
    """400 naming every key `ChatRequest` does not know."""
    unknown = sorted(set(body) - set(ChatRequest.model_fields))
    if not unknown:
        return
    hint = None
    if "extra_body" in unknown:
        hint = (
            "the OpenAI client sends extra_body's keys at the top level of the request; "
            "a raw request puts alpha, persona, layers ... there itself"
        )
    names = ", ".join(repr(k) for k in unknown)
    raise APIError(400, f"unknown request field{'s' if len(unknown) > 1 else ''} {names}", param=unknown[0], hint=hint)


class SteeredEngine:
    """Turns OpenAI request bodies into steered generations on one model, in mixed batches of up to
    `max_batch` rows (fewer where the engine mixes fewer; at most `max_queue` wait, more get 429)."""

    def __init__(
        self,
        lm: ModelHandle,
        workspace: Workspace,
        defaults: ServeDefaults,
        *,
        model_id: str | None = None,
        exposed: bool = False,
        max_batch: int = 8,
        max_queue: int = 64,
    ):
        self.lm = lm
        self.workspace = workspace
        self.defaults = defaults
        self.model_id = model_id or lm.source.spec
        self.exposed = exposed
        self.created = int(time.time())
        self.backend = BatchingChat(engine_for(lm), max_batch=max_batch, max_queue=max_queue)
        self._vectors: dict[tuple[Path, int, int], LoadedVector] = {}
        # (spec, norm, position, aggregator) → the resolved term and its vector file's version
        self._terms: OrderedDict[tuple[str, str, str, str], tuple[ResolvedTerm, Any]] = OrderedDict()
        # (spec, position, aggregator) → the resolved condition and its vector file's version
        self._conditions: OrderedDict[tuple[str, str, str], tuple[Condition, Any]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._running: set[TurnStream] = set()
        self._trusted: set[Path] = set()  # files named at start-up: read even when outside the workspace
        if defaults.vector:
            self._trusted.add(self.workspace.find_vector(defaults.vector, lm.source.slug).resolve())
        self.warnings: list[str] = []
        try:  # the defaults are checked at start-up, not per request
            default_terms = self._resolve_plan(defaults.plan, defaults.norm)
            self._trusted |= {Path(t.vector_path).resolve() for t in default_terms}
            for spec, term in zip(defaults.plan, default_terms, strict=True):  # requests without `steer` reuse them
                self._terms[(spec, defaults.norm, defaults.position, defaults.aggregator)] = (term, _version(term))
            if defaults.when is not None:
                default = self._resolve_condition(defaults.when, defaults.position, defaults.aggregator, False)
                self._trusted.add(default.loaded.path.resolve())
            self.default_session = self._session({})
        except APIError as exc:
            raise InputError(exc.message, hint=exc.hint) from None

    # ---------------------------------------------------------------- request → session

    def vector(self, spec: str) -> LoadedVector:
        """A persona (trait name or vector file), loaded once per file version."""
        if self.exposed and ("/" in spec or "\\" in spec or spec.endswith(".safetensors")):
            self._check_allowed(Path(spec).resolve(), spec)  # before touching the file system
        path = self.workspace.find_vector(spec, self.lm.source.slug).resolve()
        if self.exposed:
            self._check_allowed(path, spec)
        stat = path.stat()
        key = (path, stat.st_mtime_ns, stat.st_size)
        with self._cache_lock:
            if key not in self._vectors:
                loaded = load_for_model(self.workspace, str(path), self.lm)
                if loaded.warning:
                    self.warnings.append(loaded.warning)
                self._vectors[key] = loaded
            return self._vectors[key]

    def _check_allowed(self, path: Path, spec: str, what: str = "persona") -> None:
        """An exposed server reads only workspace files and the files given at start-up."""
        if not path.is_relative_to(Path(self.workspace.root).resolve()) and path not in self._trusted:
            raise InputError(
                f"{what} {spec!r}: this server does not read vector files outside its workspace",
                hint="name a trait extracted in the workspace, or a file given with --vector or --steer at start-up",
            )

    def _check_named(self, vector: str, spec: str, what: str) -> None:
        """`_check_allowed` for a vector a spec names as a file (`VECTOR` or `VECTOR:persona`)."""
        for name in {vector, vector.rpartition(":")[0]} - {""}:
            if "/" in name or "\\" in name or name.endswith(".safetensors") or Path(name).is_file():
                self._check_allowed(Path(name).resolve(), spec, what)

    def condition(self, spec: Any, position: str, aggregator: str) -> Condition | None:
        """A request's `when` (None: no condition) resolved as `--when` is (the same rules as
        `persona`), once per spec, units and vector-file version; a bad one is a 400 naming it."""
        if spec is None:
            return None
        if not isinstance(spec, str):
            raise APIError(400, 'when must be a string like "evil:12:3.5", or null for no condition', param="when")
        key = (spec, position, aggregator)
        with self._cache_lock:
            cached = self._conditions.get(key)
        if cached is not None and cached[1] == _file_version(cached[0].loaded.path):
            return cached[0]
        resolved = self._resolve_condition(spec, position, aggregator, requested=True)
        with self._cache_lock:
            self._conditions[key] = (resolved, _file_version(resolved.loaded.path))
            while len(self._conditions) > MAX_TERMS:
                self._conditions.popitem(last=False)
        return resolved

    def _resolve_condition(self, spec: str, position: str, aggregator: str, requested: bool) -> Condition:
        exposed = self.exposed and requested
        try:
            parsed = check_condition(spec, self.backend.name)
            if exposed:
                self._check_named(parsed.vector, spec, "when")
            resolved = resolve_condition(
                parsed, workspace=self.workspace, lm=self.lm, position=position, aggregator=aggregator
            )
            if exposed:
                self._check_allowed(resolved.loaded.path.resolve(), spec, "when")
        except PersonactlError as exc:
            where = "when" if requested else "--when"
            message = exc.message if spec in exc.message else f"{where} {spec!r}: {exc.message}"
            raise APIError(400, message, param="when", hint=exc.hint) from None
        if resolved.loaded.warning and resolved.loaded.warning not in self.warnings:
            self.warnings.append(resolved.loaded.warning)
        return resolved

    def plan(self, specs: Any, norm: str, position: str, aggregator: str) -> list[ResolvedTerm]:
        """A request's `steer` list resolved against the workspace (the same rules as `persona`); each
        term once per spec, units and vector-file version; a bad term is a 400 naming it."""
        if not isinstance(specs, list) or not all(isinstance(spec, str) for spec in specs):
            raise APIError(
                400, 'steer must be a list of strings like "evil:12:-4" or "evil:10-14:0:ablate"', param="steer"
            )
        return [self._cached_term(i, spec, norm, position, aggregator) for i, spec in enumerate(specs)]

    def _cached_term(self, i: int, spec: str, norm: str, position: str, aggregator: str) -> ResolvedTerm:
        key = (spec, norm, position, aggregator)
        with self._cache_lock:
            cached = self._terms.get(key)
        if cached is not None and cached[1] == _version(cached[0]):
            with self._cache_lock:
                if key in self._terms:
                    self._terms.move_to_end(key)
            return cached[0]
        resolved = self._resolve_term(i, spec, norm, position, aggregator, requested=True)
        with self._cache_lock:
            self._terms[key] = (resolved, _version(resolved))
            while len(self._terms) > MAX_TERMS:
                self._terms.popitem(last=False)
        return resolved

    def _resolve_plan(
        self,
        specs: Sequence[str],
        norm: str,
        position: str | None = None,
        aggregator: str | None = None,
        requested: bool = False,
    ) -> list[ResolvedTerm]:
        """`requested`: a request's plan (the allow-list applies; errors name `steer[i]`), else
        the command line's (its files are trusted, as --vector's)."""
        d = self.defaults
        position, aggregator = position or d.position, aggregator or d.aggregator
        return [self._resolve_term(i, spec, norm, position, aggregator, requested) for i, spec in enumerate(specs)]

    def _resolve_term(
        self, i: int, spec: str, norm: str, position: str, aggregator: str, requested: bool
    ) -> ResolvedTerm:
        exposed = self.exposed and requested
        try:
            term = parse_term(spec)
            if exposed:  # before touching the file system, as for `persona`
                self._check_named(term.vector, spec, "steer term")
            plan = resolve_plan(
                [term], workspace=self.workspace, lm=self.lm, position=position, aggregator=aggregator, norm=norm
            )
            check_plan_ops(self.backend.engine, plan.ops)
            resolved = plan.terms[0]
            if exposed:
                self._check_allowed(Path(resolved.vector_path).resolve(), spec, "steer term")
        except PersonactlError as exc:
            where = f"steer[{i}] {spec!r}" if requested else f"--steer {spec}"
            raise APIError(400, f"{where}: {exc.message}", param="steer", hint=exc.hint) from None
        if resolved.warning and resolved.warning not in self.warnings:
            self.warnings.append(resolved.warning)
        return resolved

    def _session(self, body: Mapping[str, Any]) -> ChatSession:
        d = self.defaults
        persona = _get(body, "persona", str, d.vector)
        steer = body.get("steer")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = d.max_tokens if max_tokens is None else max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise APIError(400, "max_tokens must be a positive integer", param="max_tokens")
        temperature = _get(body, "temperature", (int, float), d.temperature)
        top_p = _get(body, "top_p", (int, float), d.top_p)
        if not 0 <= temperature <= 2 or not 0 < top_p <= 1:
            raise APIError(400, "temperature must be in 0..2 and top_p in (0, 1]", param="temperature")
        session = ChatSession(
            self.lm,
            self.workspace,
            self.vector(persona) if persona else None,
            layers=_layers(body.get("layers"), d.layers),
            alpha=_get(body, "alpha", (int, float), d.alpha),
            max_alpha=d.max_alpha,
            positions=_get(body, "positions", str, d.positions),
            norm=_get(body, "norm", str, d.norm),
            position=_get(body, "position", str, d.position),
            aggregator=_get(body, "aggregator", str, d.aggregator),
            sampling=Sampling(max_tokens, float(temperature), float(top_p)),
            seed=_seed(body, d.seed),
            backend=self.backend,
        )
        if session.vector is None and body.get("alpha") not in (None, 0):
            raise APIError(
                400,
                "alpha scales the persona's vector, and this server has no default persona",
                param="alpha",
                hint="send persona too",
            )
        specs = list(d.plan) if steer is None else steer
        if specs:  # resolved in the session's (checked) units; add terms within ±max_alpha as α is
            for term in self.plan(specs, session.norm, session.position, session.aggregator):
                session.add_term(term)
        when = body["when"] if "when" in body else d.when  # `when: null` drops the default
        session.set_condition(self.condition(when, session.position, session.aggregator))
        return session

    def start(self, body: Any) -> Completion:
        """Validate a chat-completion request and start generating its reply (400/404 on bad input)."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        check_keys(body)
        model = body.get("model")
        if model not in (None, "", self.model_id):
            raise APIError(
                404, f"the model {model!r} does not exist; this server serves {self.model_id!r}", code="model_not_found"
            )
        if body.get("n", 1) not in (None, 1):
            raise APIError(400, "only n = 1 is supported", param="n")
        for name in ("stop", "tools", "tool_choice", "logprobs", "top_logprobs", "functions", "logit_bias"):
            if body.get(name):
                raise APIError(400, f"{name!r} is not supported by this server", param=name)
        for name in ("frequency_penalty", "presence_penalty"):
            if body.get(name) not in (None, 0):
                raise APIError(400, f"{name!r} is not supported by this server (only 0)", param=name)
        if (body.get("response_format") or {"type": "text"}) != {"type": "text"}:
            raise APIError(400, "only text replies are supported (response_format)", param="response_format")
        messages = _messages(body.get("messages"))
        options = body.get("stream_options") or {}
        try:
            session = self._session(body)
            session.history = messages[:-1]
            stream = session.send(messages[-1]["content"])
        except QueueFull as exc:
            raise APIError(429, exc.message, hint=exc.hint, retry_after=exc.retry_after) from None
        except PersonactlError as exc:
            raise APIError(400, exc.message, hint=exc.hint) from None
        completion = Completion(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            stream=stream,
            session=session,
            include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        )
        with self._cache_lock:
            self._running.add(stream)
        return completion

    # ---------------------------------------------------------------- replies in OpenAI's shapes

    def complete(self, completion: Completion) -> dict[str, Any]:
        """Wait for the whole reply: a `chat.completion` object (a request error the engine raises
        after the request was queued is a 400, as before)."""
        try:
            with self._finishing(completion) as stream:
                for _ in stream:
                    pass
        except REQUEST_ERRORS as exc:
            raise APIError(400, exc.message, hint=exc.hint) from None
        turn = stream.turn
        return {
            **self._head(completion, "chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": turn.reply},
                    "logprobs": None,
                    "finish_reason": _finish_reason(turn.finish_reason),
                }
            ],
            "usage": self._usage(completion),
            "personactl": self.describe_steering(completion.session),
        }

    def chunks(self, completion: Completion) -> Iterator[dict[str, Any]]:
        """The reply as `chat.completion.chunk` objects (closing the iterator early stops generation)."""
        head = self._head(completion, "chat.completion.chunk")
        extra = {"usage": None} if completion.include_usage else {}

        def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
            return {
                **head,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
                **extra,
            }

        with self._finishing(completion) as stream:
            yield {
                **chunk({"role": "assistant", "content": ""}),
                "personactl": self.describe_steering(completion.session),
            }
            for piece in stream:
                yield chunk({"content": piece})
        yield chunk({}, _finish_reason(stream.turn.finish_reason))
        if completion.include_usage:
            yield {**head, "choices": [], "usage": self._usage(completion)}

    @contextlib.contextmanager
    def _finishing(self, completion: Completion) -> Iterator[TurnStream]:
        try:
            with completion.stream as stream:  # leaving early stops the generation and waits for it
                yield stream
        finally:
            with self._cache_lock:
                self._running.discard(completion.stream)

    def _head(self, completion: Completion, kind: str) -> dict[str, Any]:
        return {"id": completion.id, "object": kind, "created": completion.created, "model": self.model_id}

    @staticmethod
    def _usage(completion: Completion) -> dict[str, int]:
        turn = completion.stream.turn
        return {
            "prompt_tokens": turn.n_prompt_tokens,
            "completion_tokens": turn.n_tokens,
            "total_tokens": turn.n_prompt_tokens + turn.n_tokens,
        }

    @staticmethod
    def describe_steering(session: ChatSession) -> dict[str, Any]:
        """What a reply ran with (no file paths: they are the server's business)."""
        vector = session.vector
        warnings = [vector.warning] if vector is not None and vector.warning else []
        plan = session.resolved_plan()
        warnings += [w for w in plan.warnings if w not in warnings]
        warning = {"warning": "; ".join(warnings)} if warnings else {}
        return {
            **warning,
            "persona": vector.label if vector is not None else None,
            "plan": session.plan_specs(),  # `--steer` specs, applied in order after α·v
            "plan_applied": [  # per term: the value applied at each layer (α, or c / τ in stream units)
                {"trait": t.label, "applied": {str(k): v for k, v in t.raw_values.items()}} for t in plan.terms
            ],
            "alpha": session.alpha,
            "layers": list(session.layers),
            "positions": session.positions,
            "norm": session.norm,
            "position": session.position,
            "aggregator": session.aggregator,
            # the condition, and for a reply its verdict: the prompt's projection and whether it steered
            "when": session.last_condition or (session.condition and {"spec": session.condition.spec.spec()}),
        }

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "personactl",
            "personactl": {
                **self.describe_steering(self.default_session),
                "max_alpha": self.defaults.max_alpha,
                "num_layers": self.lm.num_layers,
            },
        }

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop every reply being generated and wait (bounded) for the model to be free."""
        with self._cache_lock:
            running = list(self._running)
        for stream in running:
            stream.stop()
        self.backend.close()
        self.backend.idle(timeout)


def _get(body: Mapping[str, Any], name: str, kinds: Any, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or isinstance(value, bool):
        kind = {str: "a string", int: "an integer"}.get(kinds, "a number")
        raise APIError(400, f"{name} must be {kind}", param=name)
    return value


MAX_SEED = 2**63 - 1  # torch.manual_seed and vLLM take a 64-bit seed


def _seed(body: Mapping[str, Any], default: int) -> int:
    seed = _get(body, "seed", int, default)
    if not 0 <= seed <= MAX_SEED:
        raise APIError(400, f"seed must be between 0 and {MAX_SEED}", param="seed")
    return seed


def _layers(value: Any, default: list[int]) -> list[int]:
    """`12`, `[12, 14]` or `"12,14-16"`; the session checks the range."""
    if value is None:
        return default
    if isinstance(value, str):
        return parse_ranges(value)
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(x, int) and not isinstance(x, bool) for x in values):
        raise APIError(400, 'layers must be an integer, a list of integers or a string like "12,14-16"', param="layers")
    return values


def _messages(raw: Any) -> list[dict[str, str]]:
    """OpenAI messages as plain chat-template messages; the last one must be the user's."""
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(raw):
        role = ROLES.get(message.get("role")) if isinstance(message, dict) else None
        if role is None:
            raise APIError(400, f"messages[{i}] needs a role of {', '.join(ROLES)}", param="messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(400, f"messages[{i}]: only text content is supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param="messages")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    return out


def _version(term: ResolvedTerm) -> Any:
    """A term's vector file version (None once it is gone): a cached term is stale when it changes."""
    return _file_version(term.vector_path)


def _file_version(path: str | Path) -> Any:
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"  # "interrupted" only happens at shutdown


# -------------------------------------------------------------------- HTTP (FastAPI on uvicorn)


def _quiet(message: str) -> None:
    pass


def create_app(engine: SteeredEngine, api_key: str | None = None, log: Callable[[str], None] = _quiet) -> Any:
    """The OpenAI-compatible routes over `engine`: JSON errors in OpenAI's shape, an API key when
    given, streamed replies as server-sent events, one log line per request."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # a request waiting for its reply holds a worker thread: room for every one the queue admits
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, engine.backend.max_batch + engine.backend.max_queue + 8)
        yield

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:  # the server goes on
        log("".join(traceback.format_exception(exc)))
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}").body(), status_code=500)

    @app.exception_handler(404)
    async def no_route(request: Request, _exc: Exception) -> JSONResponse:
        return JSONResponse(APIError(404, f"no route {request.method} {request.url.path}").body(), status_code=404)

    def authorize(request: Request) -> None:
        given = request.headers.get("Authorization", "")
        if api_key and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return engine.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        if model_id != engine.model_id:
            raise APIError(404, f"the model {model_id!r} does not exist", code="model_not_found")
        return engine.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await _json_body(request)
        authorize(request)
        completion = await run_in_threadpool(engine.start, body)
        if body.get("stream"):
            return StreamingResponse(_events(engine, completion, log), media_type="text/event-stream")
        document = await run_in_threadpool(engine.complete, completion)
        log(request_line(completion))
        return JSONResponse(document)

    return app


async def _json_body(request: Any) -> Any:
    length = request.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise APIError(413, f"the request body is larger than {MAX_BODY} bytes")
    data = await request.body()
    if len(data) > MAX_BODY:
        raise APIError(413, f"the request body is larger than {MAX_BODY} bytes")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None


async def _events(engine: SteeredEngine, completion: Completion, log: Callable[[str], None]) -> AsyncIterator[bytes]:
    """Server-sent events, one per chunk, then `[DONE]`; a client that leaves stops its generation
    (the chunks are closed in a thread: the reply drains there, not in the event loop)."""
    chunks = engine.chunks(completion)
    finished = False
    try:
        while (chunk := await run_in_threadpool(next, chunks, None)) is not None:
            yield b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"
        finished = True
    except REQUEST_ERRORS as exc:  # headers are gone: report in the stream, then end it
        error = APIError(400, exc.message, hint=exc.hint).body()
        yield b"data: " + json.dumps(error).encode() + b"\n\n"
    except Exception as exc:
        log("".join(traceback.format_exception(exc)))
        error = APIError(500, f"generation failed: {type(exc).__name__}: {exc}").body()
        yield b"data: " + json.dumps(error).encode() + b"\n\n"
    finally:
        if not finished:
            completion.stream.stop()
            threading.Thread(target=chunks.close, daemon=True).start()
    if finished:
        log(request_line(completion))
    yield b"data: [DONE]\n\n"


def request_line(completion: Completion) -> str:
    """One line per finished request: when, which, how long it queued, how fast it generated."""
    turn, session = completion.stream.turn, completion.session
    waited = completion.stream.waited_s
    seconds = time.perf_counter() - completion.started
    generating = max(seconds - waited, 1e-9)
    tokens = turn.n_tokens if turn else 0
    persona = session.vector.label if session.vector is not None else "-"
    plan = f" plan={len(session.plan)} terms" if session.plan else ""
    verdict = session.last_condition
    if verdict is not None:
        plan += f" when={verdict['projection']:.4g}:{'steered' if verdict['steered'] else 'unsteered'}"
    return (
        f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {completion.id} persona={persona} "
        f"α={session.alpha:g} layers={session.layers}{plan} {turn.n_prompt_tokens if turn else 0}+{tokens} tokens "
        f"queued {waited:.2f}s, {seconds:.2f}s in all, {tokens / generating:.1f} tokens/s"
    )


class SteeredHTTPServer:
    """uvicorn serving `create_app(engine)` on a socket bound at construction (so `url` is known,
    even for port 0, before serving starts). `serve_forever` blocks (in the main thread it stops on
    Ctrl-C / SIGTERM); `shutdown` from another thread stops it and waits."""

    def __init__(
        self,
        engine: SteeredEngine,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        log: Callable[[str], None] = _quiet,
    ):
        self.engine, self.api_key, self.log = engine, api_key or None, log
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host.strip("[]"), port))
            self.socket.listen(2048)  # connections wait in the backlog until uvicorn accepts them
        except OSError:
            self.socket.close()
            raise
        app = create_app(engine, self.api_key, log)
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=10)
        self._server = _Uvicorn(config, engine)
        self._stopped = threading.Event()

    @property
    def server_address(self) -> tuple[str, int]:
        return self.socket.getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"

    def serve_forever(self) -> None:
        try:
            self._server.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self, timeout: float = 60.0) -> None:
        self._server.should_exit = True
        self._stopped.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, stopping the replies being generated before it waits for connections."""

    def __init__(self, config: uvicorn.Config, engine: SteeredEngine):
        super().__init__(config)
        self.engine = engine

    async def shutdown(self, sockets: Any = None) -> None:
        await asyncio.to_thread(self.engine.shutdown)
        await super().shutdown(sockets)
