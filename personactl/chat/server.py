"""An OpenAI-compatible HTTP server for a steered model: `/v1/chat/completions` and `/v1/models`.

Each request becomes a one-turn `ChatSession` carrying that request's steering (persona, α, layers,
positions, norm; the command line gives the defaults), so validation, chat templating, streaming
and finish reasons are exactly the chat's, on either backend (`chat.session.chat_backend`).
Generations run one at a time: the backend holds one lock from steering-in to steering-out (HF
hooks, or the vLLM engine's steering buffers), so a request's α never touches another's tokens.
(Batching requests with per-row coefficients would be faster, but on CPU a row of a batch differs
from the same run alone in the last bits, so a greedy reply would depend on what else was in flight.)

The transport is the standard library's `ThreadingHTTPServer` (a thread per connection; no new
dependency); streaming replies are server-sent events over chunked transfer encoding.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from personactl.backends import Sampling
from personactl.chat.session import ChatSession, TurnStream, chat_backend
from personactl.core.ranges import parse_ranges
from personactl.errors import InputError, PersonactlError
from personactl.store.vectors import LoadedVector, load_for_model

if TYPE_CHECKING:
    from personactl.model.loading import ModelHandle
    from personactl.store.workspace import Workspace

MAX_BODY = 8 << 20
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

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None, hint=None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.hint = status, message, code, param, hint

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        if self.status >= 500:
            kind = "server_error"
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        if self.hint:
            error["hint"] = self.hint
        return {"error": error}


@dataclass(frozen=True)
class ServeDefaults:
    """Steering and sampling for requests that do not say otherwise (the command line's values)."""

    vector: str
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


@dataclass
class Completion:
    """One accepted request: its session (whose steering is fixed) and the reply being generated."""

    id: str
    created: int
    stream: TurnStream
    session: ChatSession
    include_usage: bool = False
    started: float = field(default_factory=time.perf_counter)


class SteeredEngine:
    """Turns OpenAI request bodies into steered generations on one model, one generation at a time."""

    def __init__(
        self,
        lm: ModelHandle,
        workspace: Workspace,
        defaults: ServeDefaults,
        *,
        model_id: str | None = None,
        exposed=False,
    ):
        self.lm = lm
        self.workspace = workspace
        self.defaults = defaults
        self.model_id = model_id or lm.source.spec
        self.exposed = exposed
        self.created = int(time.time())
        self.lock = threading.Lock()
        self.backend = chat_backend(lm, self.lock)
        self._vectors: dict[tuple[Path, int, int], LoadedVector] = {}
        self._cache_lock = threading.Lock()
        self._running: set[TurnStream] = set()
        self._trusted = {self.workspace.find_vector(defaults.vector, lm.source.slug).resolve()}
        self.warnings: list[str] = []
        self.default_session = self._session({})  # the defaults are checked at start-up, not per request

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

    def _check_allowed(self, path: Path, spec: str) -> None:
        """An exposed server reads only workspace files and the files given at start-up."""
        if not path.is_relative_to(Path(self.workspace.root).resolve()) and path not in self._trusted:
            raise InputError(
                f"persona {spec!r}: this server does not read vector files outside its workspace",
                hint="name a trait extracted in the workspace, or a file given with --vector at start-up",
            )

    def _session(self, body: Mapping[str, Any]) -> ChatSession:
        d = self.defaults
        persona = _get(body, "persona", str, d.vector)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = d.max_tokens if max_tokens is None else max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise APIError(400, "max_tokens must be a positive integer", param="max_tokens")
        temperature = _get(body, "temperature", (int, float), d.temperature)
        top_p = _get(body, "top_p", (int, float), d.top_p)
        if not 0 <= temperature <= 2 or not 0 < top_p <= 1:
            raise APIError(400, "temperature must be in 0..2 and top_p in (0, 1]", param="temperature")
        return ChatSession(
            self.lm,
            self.workspace,
            self.vector(persona),
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

    def start(self, body: Any) -> Completion:
        """Validate a chat-completion request and start generating its reply (400/404 on bad input)."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model not in (None, "", self.model_id):
            raise APIError(
                404, f"the model {model!r} does not exist; this server serves {self.model_id!r}", code="model_not_found"
            )
        if body.get("n", 1) != 1:
            raise APIError(400, "only n = 1 is supported", param="n")
        for name in ("stop", "tools", "logprobs", "functions"):
            if body.get(name):
                raise APIError(400, f"{name!r} is not supported by this server", param=name)
        if (body.get("response_format") or {"type": "text"}) != {"type": "text"}:
            raise APIError(400, "only text replies are supported (response_format)", param="response_format")
        messages = _messages(body.get("messages"))
        options = body.get("stream_options") or {}
        try:
            session = self._session(body)
            session.history = messages[:-1]
            stream = session.send(messages[-1]["content"])
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
        """Wait for the whole reply: a `chat.completion` object."""
        with self._finishing(completion) as stream:
            for _ in stream:
                pass
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
        warning = {"warning": session.vector.warning} if session.vector.warning else {}
        return {
            **warning,
            "persona": session.vector.label,
            "alpha": session.alpha,
            "layers": list(session.layers),
            "positions": session.positions,
            "norm": session.norm,
            "position": session.position,
            "aggregator": session.aggregator,
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
        if self.lock.acquire(timeout=timeout):
            self.lock.release()


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


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"  # "interrupted" only happens at shutdown


# -------------------------------------------------------------------- HTTP


class SteeredHTTPServer(ThreadingHTTPServer):
    """A thread per connection; requests share the engine, which runs generations one at a time."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        engine: SteeredEngine,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        log: Callable[[str], None] = lambda message: None,
    ):
        self.engine, self.api_key, self.log = engine, api_key or None, log
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host.strip("[]"), port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "personactl"
    server: SteeredHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log(f"{self.address_string()} {format % args}")

    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def _dispatch(self, action: Callable[[str], None]) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        try:
            action(path)
        except APIError as exc:
            self._json(exc.status, exc.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # the request fails, the server goes on
            self.server.log(traceback.format_exc())
            self._json(500, APIError(500, f"internal error: {type(exc).__name__}: {exc}").body())

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")

    def _get(self, path: str) -> None:
        engine = self.server.engine
        if path == "/health":
            self._json(200, {"status": "ok"})
            return
        self._authorize()
        if path == "/v1/models":
            self._json(200, engine.models())
        elif path == f"/v1/models/{engine.model_id}":
            self._json(200, engine.model_card())
        else:
            raise APIError(404, f"no route GET {path}")

    def _post(self, path: str) -> None:
        body = self._body()
        self._authorize()
        if path != "/v1/chat/completions":
            raise APIError(404, f"no route POST {path}")
        completion = self.server.engine.start(body)
        if body.get("stream"):
            self._stream(completion)
        else:
            self._json(200, self.server.engine.complete(completion))
        turn = completion.stream.turn
        if turn is not None:
            steering = completion.session
            self.server.log(
                f"{completion.id} α={steering.alpha:g} persona={steering.vector.label} layers={steering.layers} "
                f"{turn.n_prompt_tokens}+{turn.n_tokens} tokens {time.perf_counter() - completion.started:.2f}s"
            )

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise APIError(411, "a Content-Length header is required")
        if int(length) > MAX_BODY:
            self.close_connection = True
            raise APIError(413, f"the request body is larger than {MAX_BODY} bytes")
        try:
            return json.loads(self.rfile.read(int(length)))
        except ValueError as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}") from None

    def _json(self, status: int, document: Any) -> None:
        data = json.dumps(document, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, completion: Completion) -> None:
        """Server-sent events, one per chunk, then `[DONE]`; a client that leaves stops its generation."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            with contextlib.closing(self.server.engine.chunks(completion)) as chunks:
                for chunk in chunks:
                    self._chunk(b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        except Exception as exc:  # headers are gone: report in the stream, then end it
            self.server.log(traceback.format_exc())
            error = APIError(500, f"generation failed: {type(exc).__name__}: {exc}").body()
            self._chunk(b"data: " + json.dumps(error).encode() + b"\n\n")
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()
