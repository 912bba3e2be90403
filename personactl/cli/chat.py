"""`personactl chat`: a multi-turn chat with the steered model, in a terminal or over a pipe.

The engine is `personactl.chat.session`; this module reads lines and keys and renders. On a
terminal, prompt_toolkit reads the input line with the α slider in its bottom toolbar (Alt-←/→
move it, Alt-0 resets it; plain arrows keep moving the cursor; its range and step follow the norm
mode, and it shows ‖α·v‖ against the layer's stream norm); with a steering plan (`--steer`, `/steer`)
each term has a slider too (Alt-↑/↓ switch the one the keys move; the toolbar lists every term with
its value), replies stream as they are generated,
Ctrl-C stops a reply (cut where the screen shows it) and Ctrl-D leaves (asking once when turns are
not saved). Otherwise each input line is one message and
each output line one reply (JSON lines with --json). Slash commands work in both.
"""

from __future__ import annotations

import contextlib
import json as jsonlib
import sys
import threading
import unicodedata
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any, Optional, TextIO

import typer

from personactl.chat.commands import HELP, Outcome, one_line, run_command, split_line, turn_record
from personactl.cli import options as o
from personactl.cli.common import (
    guarded,
    load_engine,
    log,
    open_workspace,
    placement,
    report,
    settings_from,
    stdout_console,
)

if TYPE_CHECKING:
    from rich.console import Console

    from personactl.chat.session import ChatSession, TurnStream

ChatVector = Annotated[
    Optional[str],
    typer.Option(
        "--vector",
        "-v",
        help="Vector file, or a trait name extracted in the workspace for --model: the α slider's vector "
        "(optional with --steer).",
        show_default=False,
    ),
]
Alpha = Annotated[float, typer.Option("--alpha", "-a", help="Starting α (the steering strength).")]
MaxAlpha = Annotated[
    Optional[float],
    typer.Option(
        "--max-alpha",
        help="The slider runs from −max to +max; α outside it is refused. Default: it follows the norm "
        "mode: raw ±3, stream ±0.5 (α is then ‖α·v‖ over the layer's stream norm), unit half the "
        "layers' stream norm. Given, it holds in every mode.",
        show_default=False,
    ),
]
AlphaStep = Annotated[
    Optional[float],
    typer.Option(
        "--alpha-step",
        help="How far one Alt-←/→ moves α. Default: about a twelfth of the range (raw 0.25, stream 0.05).",
        show_default=False,
    ),
]
SystemPrompt = Annotated[Optional[str], typer.Option("--system", help="System prompt.", show_default=False)]
Temperature = Annotated[
    float, typer.Option("--temperature", min=0.0, help="0 = greedy (the default: same input, same reply).")
]
Readout = Annotated[
    Optional[str],
    typer.Option(
        "--readout",
        help="After each reply, show a readout: a file from `readout train` (top concepts), or `vector` "
        "(the projection on the steering vector).",
        show_default=False,
    ),
]
JsonLines = Annotated[
    bool, typer.Option("--json", help="Line mode with JSON lines out: message, reply, alpha, layers, …")
]
When = Annotated[
    Optional[str],
    typer.Option(
        "--when",
        help="Steer a reply only when its prompt's (the conversation's) last-token projection on a condition "
        "vector is above a threshold: VECTOR[@position[/aggregator]]:LAYER:THRESHOLD (see `personactl condition "
        "fit`); other replies are unsteered. /when changes it.",
        show_default=False,
    ),
]


@guarded
def chat(
    vector: ChatVector = None,
    plan: o.SteerPlan = None,
    when: When = None,
    layers: o.MiddleLayer = None,
    alpha: Alpha = 1.0,
    max_alpha: MaxAlpha = None,
    alpha_step: AlphaStep = None,
    position: o.VectorPosition = o.PositionChoice.response_avg,
    aggregator: o.Aggregator = o.AggregatorChoice.mean_diff,
    steer_positions: o.SteerPositions = o.SteerMode.all,
    old_positions: o.OldSteerPositions = None,
    norm: o.Norm = o.NormMode.raw,
    system: SystemPrompt = None,
    max_new_tokens: o.MaxNewTokens = None,
    temperature: Temperature = 0.0,
    top_p: o.TopP = None,
    seed: o.Seed = None,
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
    readout: Readout = None,
    json: JsonLines = False,
) -> None:
    """Chat with the steered model: sliders for α and each --steer term in the terminal, or one reply per input line."""
    from personactl.backends import Sampling
    from personactl.chat.readout import LiveReadout
    from personactl.chat.session import ChatSession
    from personactl.settings import masked_dump
    from personactl.steps.steer import default_layer

    positions = o.steer_positions(steer_positions, old_positions)
    check_slider(alpha, max_alpha, alpha_step, norm.value)
    terms, layer_list = check_steering(vector, plan, readout, layers)
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
    lm, condition = load_checked(settings, positions, readout, when)
    session = ChatSession(
        lm,
        ws,
        vector,
        layers=layer_list or [default_layer(lm.num_layers)],
        alpha=alpha,
        max_alpha=max_alpha,
        alpha_step=alpha_step,
        positions=positions,
        norm=norm.value,
        position=position.value,
        aggregator=aggregator.value,
        sampling=Sampling(settings.max_new_tokens, temperature, settings.top_p),
        seed=settings.seed,
        system=system,
        settings_record=masked_dump(settings),
        readout=LiveReadout.open(readout, lm) if readout else None,
        plan=terms,
        when=condition,
        read_batch_tokens=settings.extract_batch_tokens,
    )
    run_front_end(session, json)


def load_checked(settings: Any, positions: str, readout: str | None, when: str | None) -> tuple[Any, Any]:
    """The engine and the parsed --when condition; first, what the readout and the condition need of
    the engine (reading activations in this process) is checked, before minutes of start-up."""
    from personactl.chat.readout import require_reader
    from personactl.steps.condition import check_condition

    if readout:
        require_reader(settings.backend)
    condition = check_condition(when, settings.backend) if when else None
    return load_engine(settings, steering=True, positions=positions), condition


def check_steering(
    vector: str | None, plan: list[str] | None, readout: str | None, layers: str | None
) -> tuple[list[Any], list[int] | None]:
    """Something to steer with, every --steer term well-formed (`PlanTerm`s) and the layers parsed,
    before the model loads."""
    from personactl.core.ranges import parse_ranges
    from personactl.core.steer_plan import parse_term
    from personactl.errors import InputError

    if vector is None and not plan:
        raise InputError("nothing to steer with", hint="pass --vector NAME (the α slider) and/or --steer SPEC (a plan)")
    if vector is None and readout == "vector":
        raise InputError(
            "--readout vector reads the projection on --vector, and none is given", hint="pass --vector NAME"
        )
    return [parse_term(spec) for spec in plan or ()], parse_ranges(layers) if layers else None


def check_slider(alpha: float, max_alpha: float | None, alpha_step: float | None, norm: str) -> None:
    """Refuse a slider that cannot hold the starting α, before the model loads (unit's range needs
    the vector, so it is checked later)."""
    from personactl.chat.session import SLIDER_RANGES, check_alpha
    from personactl.errors import InputError

    if (max_alpha is not None and not max_alpha > 0) or (alpha_step is not None and not alpha_step > 0):
        raise InputError("--max-alpha and --alpha-step must be positive")
    bound = max_alpha if max_alpha is not None else SLIDER_RANGES.get(norm, (None,))[0]
    if bound is not None:
        check_alpha(alpha, bound, norm if max_alpha is None else None)


def run_front_end(session: ChatSession, json: bool) -> None:
    """The terminal UI on a terminal, else line mode (exit 2 when a line failed, 130 on Ctrl-C);
    first the warnings about the vectors (made for another model of this shape)."""
    vector_warning = [session.vector.warning] if session.vector is not None and session.vector.warning else []
    for warning in vector_warning + session.resolved_plan().warnings:
        log(f"warning: {warning}")
    if sys.stdin.isatty() and sys.stdout.isatty() and not json:
        run_terminal(session)
        return
    try:
        failed = run_lines(session, sys.stdin, json)
    except KeyboardInterrupt:  # a script's Ctrl-C: stop here, quietly
        raise typer.Exit(130) from None
    if failed:
        raise typer.Exit(2)  # every line was processed; the errors were reported on the way


# ---------------------------------------------------------------- line mode (stdin is not a terminal)


def run_lines(session: ChatSession, lines: TextIO, as_json: bool) -> int:
    """One message per input line, one reply per output line; returns how many lines failed.

    A message that fails still gets its output line (empty, or a JSON error), so output line i
    answers message i. Command results go to stderr, or to stdout as JSON lines with --json."""
    from personactl.errors import PersonactlError

    def out(text: str, end: str = "\n") -> None:
        sys.stdout.write(text + end)
        sys.stdout.flush()

    failures = 0
    for raw in iter(lines.readline, ""):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        kind, text = split_line(line)
        try:
            if kind == "command":
                outcome = run_command(session, text)
                if as_json:
                    out(
                        jsonlib.dumps(
                            {"command": text, "ok": True, "message": outcome.message, **outcome.json_fields()},
                            ensure_ascii=False,
                        )
                    )
                else:
                    _render_outcome(outcome, stderr=True)
                if outcome.quit:
                    break
                continue
            stream = session.send(text)
            if as_json:
                for _ in stream:
                    pass
                out(jsonlib.dumps({**turn_record(stream.turn), "ok": True}, ensure_ascii=False))
            else:
                for piece in stream:
                    out(one_line(piece), end="")
                out("")
                if stream.turn.steering.get("when"):  # stdout keeps one line per reply
                    _console(stderr=True).print(_when_text(stream.turn.steering["when"]), style="dim", markup=False)
                if stream.turn.readout is not None:
                    _console(stderr=True).print(_readout_text(stream.turn.readout), style="dim")
        except PersonactlError as exc:
            failures += 1
            report(exc)
            if as_json:
                failed = {kind: text, "ok": False, "error": exc.message, "hint": exc.hint}
                out(jsonlib.dumps(failed, ensure_ascii=False))
            elif kind == "message":
                out("")
    return failures


# ---------------------------------------------------------------- rendering (both modes)


def printable(text: str) -> str:
    """Model output may contain control characters, even escape sequences: show them, never send them raw."""
    return "".join(ch if ch in "\n\t" or unicodedata.category(ch) != "Cc" else f"\\x{ord(ch):02x}" for ch in text)


def _console(stderr: bool):
    from personactl.cli.common import stderr_console

    return stderr_console() if stderr else stdout_console()


def _render_outcome(outcome: Outcome, stderr: bool = False) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = _console(stderr)
    if outcome.message:
        console.print(escape(outcome.message), style="dim")
    if outcome.help:
        table = Table("command", "does", box=None, show_header=False)
        for usage, does in HELP:
            table.add_row(escape(usage), escape(does))
        table.add_row("Alt-←/→, Alt-0", "move the active slider (α, or a plan term's value), set it to 0")
        table.add_row("Alt-↑/↓", "switch the active slider (α, then each plan term)")
        table.add_row("Ctrl-C / Ctrl-D", "stop the reply being generated / leave (asks once if turns are unsaved)")
        console.print(table)
    if outcome.rows is not None:
        table = Table(title=f"last reply at layers {outcome.data['layers']}", show_lines=True, expand=True)
        for row in outcome.rows:
            table.add_column(f"α = {row['alpha']:+.2f}", ratio=1)
        table.add_row(*(escape(printable(row["reply"].strip())) for row in outcome.rows))
        table.add_row(*(f"[dim]{row['n_tokens']} tokens · {row['finish_reason']}[/]" for row in outcome.rows))
        console.print(table)


# ---------------------------------------------------------------- the terminal


def slider(alpha: float, max_alpha: float, width: int = 21) -> str:
    """A bar from −max to +max with ┼ at 0 and ● at α."""
    cells = ["─"] * width
    cells[width // 2] = "┼"
    cells[round((alpha + max_alpha) / (2 * max_alpha) * (width - 1))] = "●"
    return "├" + "".join(cells) + "┤"


def format_alpha(alpha: float, step: float) -> str:
    """α with two decimals, more when the step has them (+0.15, +1.25, +0.125)."""
    decimals = len(f"{step:g}".partition(".")[2]) if "e" not in f"{step:g}" else 4
    return f"{alpha:+.{max(2, min(decimals, 4))}f}"


def toolbar(session: ChatSession, width: int | None = None) -> list[tuple[str, str]]:
    """The active slider (α and ‖α·v‖, or a plan term's value), every plan term with its value, the
    settings and the keys; on a terminal narrower than all of it the keys go first, then the
    settings, then the terms from the last (the active slider always shows)."""
    from personactl.core.ranges import format_ranges

    head = _active_slider(session)
    step = session.alpha_step if session.active == 0 else session.term_range(session.active)[1]
    terms = [
        ("class:alpha" if session.active == n else "class:term", f" {session.describe_term(n)} ")
        for n in range(1, len(session.plan) + 1)
    ]
    vector = session.vector.label if session.vector is not None else "no vector"
    switch = " Alt-↑/↓ slider" if len(session.sliders()) > 1 else ""
    parts = [
        *head,
        *terms,
        *_condition_part(session),
        ("", f" L{format_ranges(session.layers)} · {session.positions} · {session.norm} · {vector} "),
        ("class:keys", f" Alt-←/→ ±{step:g}{switch} "),
    ]
    while width is not None and len(parts) > len(head) and sum(len(text) for _, text in parts) > width:
        parts.pop()
    return parts


def _condition_part(session: ChatSession) -> list[tuple[str, str]]:
    """`when evil:12:3.5 · last 4.21 steered`: the condition and the last reply's verdict under it."""
    if session.condition is None:
        return []
    last = session.last_condition
    verdict = (
        "" if last is None else f" · last {last['projection']:.3g} {'steered' if last['steered'] else 'not steered'}"
    )
    return [("class:term", f" when {session.condition.spec.spec()}{verdict} ")]


def _active_slider(session: ChatSession) -> list[tuple[str, str]]:
    """The bar from −max to +max with the active slider's value (a plan term without a range: its value)."""
    from personactl.chat.session import VALUE_NAMES, value_text

    if session.active == 0:
        if session.vector is None:
            return [("class:alpha", " no vector: /vector V steers with one, /steer SPEC adds a term ")]
        top, step = session.slider_range()
        return [
            ("class:ends", f" −{top:g} "),
            ("class:bar", slider(session.alpha, top)),
            ("class:ends", f" +{top:g} "),
            ("class:alpha", f" α {format_alpha(session.alpha, step)} "),
            ("class:push", f" {session.describe_push()} "),
        ]
    n = session.active
    term = session.plan[n - 1]
    top, step = session.term_range(n)
    if term.value is None:  # a τ from data (pNN) or the saved thresholds: no number on a slider
        return [("class:alpha", f" term {n}: {VALUE_NAMES[term.op]} {value_text(term)} ")]
    value = f" term {n}: {VALUE_NAMES[term.op]} {format_alpha(term.value, step)} "
    if top is None:
        return [("class:alpha", value)]
    return [
        ("class:ends", f" −{top:g} "),
        ("class:bar", slider(max(-top, min(top, term.value)), top)),
        ("class:ends", f" +{top:g} "),
        ("class:alpha", value),
    ]


STYLE = {
    "bottom-toolbar": "noreverse bg:#202020 #d0d0d0",
    "bottom-toolbar.bar": "#5fafff",
    "bottom-toolbar.alpha": "bold #ffd75f",
    "bottom-toolbar.push": "#d7af5f",
    "bottom-toolbar.keys": "#808080",
    "bottom-toolbar.term": "#87afd7",
    "you": "bold #5fd75f",
}


def run_terminal(session: ChatSession) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.styles import Style
    from rich.markup import escape

    from personactl.errors import PersonactlError

    def key(action: Callable[[], Any]) -> Callable[[Any], None]:
        def handler(event: Any) -> None:
            with contextlib.suppress(PersonactlError):  # e.g. α keys with no vector: nothing moves
                action()

        return handler

    keys = KeyBindings()
    keys.add("escape", "right")(key(lambda: session.nudge(+1)))  # Alt-→ (or Esc then →): the active slider
    keys.add("escape", "left")(key(lambda: session.nudge(-1)))
    keys.add("escape", "0")(key(session.zero))
    keys.add("escape", "down")(key(lambda: session.switch(+1)))  # Alt-↓/↑: the next / previous slider
    keys.add("escape", "up")(key(lambda: session.switch(-1)))
    prompt = PromptSession(
        history=InMemoryHistory(),
        key_bindings=keys,
        bottom_toolbar=lambda: toolbar(session, _columns()),
        style=Style.from_dict(STYLE),
    )
    console = stdout_console()
    plan = f" and a plan of {len(session.plan)} term{'s' if len(session.plan) != 1 else ''}" if session.plan else ""
    vector = escape(session.vector.label) if session.vector is not None else "no vector"
    plan += f" when {escape(session.condition.spec.spec())}" if session.condition is not None else ""
    console.print(
        f"[bold]chatting with {escape(session.lm.source.spec)}[/], steering with {vector}{plan}"
        " · /help for commands · Ctrl-C stops a reply · Ctrl-D leaves",
    )
    warned = False  # the last Ctrl-D (or /quit) already said that turns are unsaved
    while True:
        try:
            line = prompt.prompt([("class:you", "you › ")])
        except KeyboardInterrupt:  # at the prompt Ctrl-C clears the line, as in a shell
            continue
        except EOFError:
            line = "/quit"
        if not line.strip():
            continue
        kind, text = split_line(line)
        if kind == "command" and text.split()[0].lower() in ("/quit", "/exit"):
            if session.unsaved and not warned:
                warned = True
                console.print(_unsaved_note(session), style="yellow")
                continue
            if session.unsaved:
                console.print(f"left without saving {_turns(session.unsaved)}", style="dim")
            break
        warned = False
        try:
            if kind == "message":
                _stream_reply(console, session.send(text))
                continue
            stop = threading.Event()
            busy = console.status("regenerating …") if text.split()[0] == "/compare" else contextlib.nullcontext()
            with _ctrl_c(stop.set), busy:
                outcome = run_command(session, text, stop)
            _render_outcome(outcome)
            if outcome.quit:
                break
        except PersonactlError as exc:
            report(exc)


def _columns() -> int | None:
    """The terminal's width while prompt_toolkit runs (None: unknown)."""
    from prompt_toolkit.application.current import get_app_or_none

    app = get_app_or_none()
    return app.output.get_size().columns if app is not None else None


@contextlib.contextmanager
def _ctrl_c(action: Callable[[], None]) -> Iterator[None]:
    """While generating, Ctrl-C (SIGINT) calls `action` instead of raising KeyboardInterrupt."""
    import signal

    previous = signal.signal(signal.SIGINT, lambda signum, frame: action())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _turns(n: int) -> str:
    return f"{n} turn{'s' if n != 1 else ''}"


def _unsaved_note(session: ChatSession) -> str:
    where = f" (rewrites {session.saved_to})" if session.saved_to else " (into the workspace)"
    return (
        f"{_turns(session.unsaved)} not saved yet: /save writes the transcript{where}; "
        "Ctrl-D again leaves without saving"
    )


@contextlib.contextmanager
def _quiet_keys() -> Iterator[None]:
    """While a reply streams, keys typed are not echoed: no `^C` in the reply when Ctrl-C stops it,
    no stray letters between its words (Ctrl-C still signals: ISIG stays on)."""
    try:
        import termios

        fd = sys.stdin.fileno()
        before = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError):  # not a terminal, or not a POSIX one
        yield
        return
    quiet = list(before)
    quiet[3] &= ~(termios.ECHO | getattr(termios, "ECHOCTL", 0))
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, before)


def _stream_reply(console: Console, stream: TurnStream) -> None:
    """Print the reply as it is generated; Ctrl-C stops it (the reply is cut where the screen shows
    it) and the chat goes on."""
    from rich.markup import escape

    console.print("[bold #5fafff]assistant ›[/] ", end="")
    with _quiet_keys(), _ctrl_c(stream.stop), stream:
        for piece in stream:
            sys.stdout.write(printable(piece))
            sys.stdout.flush()
    turn = stream.turn
    note = {
        "stop": "",
        "length": " · cut at --max-new-tokens",
        "interrupted": " · stopped by Ctrl-C (kept as shown, marked interrupted)",
    }[turn.finish_reason]
    sys.stdout.write("\n")
    terms = len(turn.steering.get("plan") or ())
    plan = f" · plan of {terms} term{'s' if terms != 1 else ''}" if terms else ""
    when = f" · {escape(_when_text(turn.steering['when']))}" if turn.steering.get("when") else ""
    console.print(
        f"[dim]α {turn.steering['alpha']:+.2f}{plan}{when} · {turn.n_tokens} tokens · {turn.seconds:.1f} s{note}[/]"
    )
    if turn.readout is not None:
        console.print(_readout_text(turn.readout), style="dim #d7af5f")


def _when_text(verdict: dict[str, Any]) -> str:
    """`when evil:12:3.5: projection 4.2: steered`, the reply's condition verdict."""
    from personactl.chat.commands import condition_text

    return f"when {verdict['spec']}: {condition_text(verdict)}"


def _readout_text(record: dict[str, Any]) -> Any:
    from rich.text import Text

    from personactl.chat.readout import readout_line

    return Text(readout_line(record))  # plain text: concept names are not rich markup
