"""`personactl serve`: an OpenAI-compatible HTTP server for the steered model (engine: `chat/server.py`)."""

from __future__ import annotations

import json as jsonlib
import os
import sys
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from personactl.cli import options as o
from personactl.cli.common import guarded, load_engine, log, open_workspace, placement, settings_from

if TYPE_CHECKING:
    from personactl.chat.server import SteeredEngine, SteeredHTTPServer

API_KEY_ENV = "PERSONACTL_SERVE_API_KEY"


DefaultVector = Annotated[
    Optional[str],
    typer.Option(
        "--vector",
        "-v",
        help="Default persona: a vector file, or a trait extracted in the workspace for --model (optional with --steer).",
        show_default=False,
    ),
]
DefaultPlan = Annotated[
    Optional[list[str]],
    typer.Option(
        "--steer",
        help="A term of the default steering plan (requests without `steer` follow it), repeatable, applied in order "
        "after α·v: VECTOR[@position[/aggregator]]:LAYERS:VALUE[:OP], OP add, ablate, cap or mean-ablate.",
        show_default=False,
    ),
]
DefaultWhen = Annotated[
    Optional[str],
    typer.Option(
        "--when",
        help="Default condition (requests may send their own `when`, or null for none): steer a request only when "
        "its prompt's last-token projection on a condition vector is above a threshold, "
        "VECTOR[@position[/aggregator]]:LAYER:THRESHOLD (see `personactl condition fit`); others are unsteered.",
        show_default=False,
    ),
]
DefaultAlpha = Annotated[float, typer.Option("--alpha", "-a", help="Default α for requests that give none.")]
MaxAlpha = Annotated[float, typer.Option("--max-alpha", help="Requests with |α| above it are refused with 400.")]
Temperature = Annotated[float, typer.Option("--temperature", min=0.0, max=2.0, help="Default temperature; 0 = greedy.")]
Host = Annotated[
    str, typer.Option("--host", help="Address to bind; anything but loopback needs --api-key or --insecure.")
]
Port = Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0 = any free port).")]
ApiKey = Annotated[
    Optional[str],
    typer.Option(
        "--api-key",
        envvar=API_KEY_ENV,
        show_envvar=False,
        help=f"Clients must send it as a Bearer token (env {API_KEY_ENV}).",
        show_default=False,
    ),
]
Insecure = Annotated[bool, typer.Option("--insecure", help="Allow a non-loopback --host without an API key.")]
ServedModelName = Annotated[
    Optional[str],
    typer.Option("--served-model-name", help="Model id clients use (default: the --model value).", show_default=False),
]
MaxBatch = Annotated[
    int,
    typer.Option(
        "--max-batch", min=1, help="Requests generated together in one mixed batch (each with its own steering)."
    ),
]
MaxQueue = Annotated[
    int, typer.Option("--max-queue", min=0, help="Requests that may wait for a batch; more get 429 with Retry-After.")
]
AnnounceJson = Annotated[
    bool, typer.Option("--json", help="Print one JSON line with the bound URL at start-up, for scripts.")
]


@guarded
def serve(
    vector: DefaultVector = None,
    plan: DefaultPlan = None,
    when: DefaultWhen = None,
    layers: o.MiddleLayer = None,
    alpha: DefaultAlpha = 1.0,
    max_alpha: MaxAlpha = 3.0,
    position: o.VectorPosition = o.PositionChoice.response_avg,
    aggregator: o.Aggregator = o.AggregatorChoice.mean_diff,
    steer_positions: o.SteerPositions = o.SteerMode.all,
    old_positions: o.OldSteerPositions = None,
    norm: o.Norm = o.NormMode.raw,
    max_new_tokens: o.MaxNewTokens = None,
    temperature: Temperature = 0.0,
    top_p: o.TopP = None,
    seed: o.Seed = None,
    host: Host = "127.0.0.1",
    port: Port = 8000,
    api_key: ApiKey = None,
    insecure: Insecure = False,
    served_model_name: ServedModelName = None,
    max_batch: MaxBatch = 8,
    max_queue: MaxQueue = 64,
    model: o.Model = None,
    revision: o.Revision = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    dtype: o.Dtype = None,
    device: o.Device = None,
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    trust_remote_code: o.TrustRemoteCode = None,
    backend: o.Backend = None,
    tensor_parallel_size: o.TensorParallelSize = None,
    pipeline_parallel_size: o.PipelineParallelSize = None,
    executor: o.DistributedExecutor = None,
    json: AnnounceJson = False,
) -> None:
    """Serve the steered model over an OpenAI-compatible API; each request may pick persona, α, layers and plan."""
    from personactl.chat.server import ServeDefaults, SteeredEngine
    from personactl.steps.steer import default_layer

    positions = o.steer_positions(steer_positions, old_positions)
    exposed = check_exposure(host, api_key, insecure)
    settings = settings_from(
        config,
        workspace=workspace,
        model=model,
        revision=revision,
        max_new_tokens=max_new_tokens,
        top_p=top_p,
        seed=seed,
        dtype=dtype,
        **placement(backend, device, device_map, max_memory, (tensor_parallel_size, pipeline_parallel_size, executor)),
        trust_remote_code=trust_remote_code,
    )
    ws = open_workspace(settings)
    layer_list = check_defaults(vector, plan, when, alpha, max_alpha, layers, settings.backend)
    lm = load_engine(settings, steering=True, positions=positions)
    defaults = ServeDefaults(
        vector=vector,
        layers=layer_list or [default_layer(lm.num_layers)],
        alpha=alpha,
        max_alpha=max_alpha,
        positions=positions,
        norm=norm.value,
        position=position.value,
        aggregator=aggregator.value,
        max_tokens=settings.max_new_tokens,
        temperature=temperature,
        top_p=settings.top_p,
        seed=settings.seed,
        plan=tuple(plan or ()),
        when=when,
    )
    limits = {"max_batch": max_batch, "max_queue": max_queue}
    engine = SteeredEngine(lm, ws, defaults, model_id=served_model_name, exposed=exposed, **limits)
    for warning in engine.warnings:
        log(f"warning: {warning}")
    run(listen(engine, host, port, api_key), json)


def check_exposure(host: str, api_key: str | None, insecure: bool) -> bool:
    """Whether `host` is reachable from other machines; refused without an API key unless --insecure."""
    from personactl.chat.server import is_loopback
    from personactl.errors import InputError

    exposed = not is_loopback(host)
    if exposed and not api_key and not insecure:
        raise InputError(
            f"refusing to serve on {host} without an API key",
            hint=f"pass --api-key (or set {API_KEY_ENV}), or --insecure if the network is trusted",
        )
    return exposed


def check_defaults(
    vector: str | None,
    plan: list[str] | None,
    when: str | None,
    alpha: float,
    max_alpha: float,
    layers: str | None,
    backend: str,
) -> list[int] | None:
    """A default persona or plan, every --steer term and the --when condition well-formed (the
    condition refused where the engine reads no activations here) and α within bounds, before the
    model loads; the --layers parsed."""
    from personactl.core.ranges import parse_ranges
    from personactl.core.steer_plan import parse_term
    from personactl.errors import InputError
    from personactl.steps.condition import check_condition

    if vector is None and not plan:
        raise InputError("nothing to steer with", hint="pass --vector NAME (the default persona) and/or --steer SPEC")
    for spec in plan or ():
        parse_term(spec)
    if when:
        check_condition(when, backend)
    check_alpha_bounds(alpha, max_alpha)
    return parse_ranges(layers) if layers else None


def check_alpha_bounds(alpha: float, max_alpha: float) -> None:
    from personactl.chat.session import check_alpha
    from personactl.errors import InputError

    if not max_alpha > 0:
        raise InputError("--max-alpha must be positive")
    check_alpha(alpha, max_alpha)


def listen(engine: SteeredEngine, host: str, port: int, api_key: str | None) -> SteeredHTTPServer:
    from personactl.chat.server import SteeredHTTPServer
    from personactl.errors import InputError

    try:
        return SteeredHTTPServer(engine, host, port, api_key=api_key, log=log)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", hint="pick another --port") from None


def run(server: SteeredHTTPServer, json: bool) -> None:
    """Announce the URL, serve until Ctrl-C (or SIGTERM), then stop generating and close cleanly."""
    import signal

    def terminate(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    engine = server.engine
    card = engine.model_card()["personactl"]
    if json:
        document = {"url": server.url, "model": engine.model_id, "pid": os.getpid(), **card}
        sys.stdout.write(jsonlib.dumps(document) + "\n")
        sys.stdout.flush()
    auth = "API key required" if server.api_key else "no API key"
    plan = f", plan {' '.join(card['plan'])}" if card["plan"] else ""
    plan += f", when {card['when']['spec']}" if card["when"] else ""
    log(
        f"serving {engine.model_id} at {server.url} ({auth}); default persona {card['persona'] or 'none'}, "
        f"α={card['alpha']:g} (max ±{card['max_alpha']:g}), layers {card['layers']}{plan}; requests generated in "
        f"batches of up to {engine.backend.max_batch} ({engine.backend.max_queue} may wait); Ctrl-C stops"
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        engine.shutdown()
        server.server_close()
    log("server stopped")
