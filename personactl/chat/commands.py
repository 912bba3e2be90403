"""The chat's slash commands and line protocol, shared by every front end of a `ChatSession`.

`run_command(session, "/alpha 2")` applies one slash command and returns an `Outcome` for the front
end to render (the terminal and the piped line mode of `personactl chat` both do). `split_line` tells
a command from a message, `one_line` and `turn_record` are what line mode writes per reply. No
terminal code and no heavy imports here: `personactl --help` imports this module.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from personactl.core.ranges import format_ranges, parse_ranges
from personactl.errors import InputError

if TYPE_CHECKING:
    from personactl.chat.session import ChatSession, ChatTurn

HELP = (
    ("/alpha A", "set α within the slider's range (Alt-←/→ move it, Alt-0 resets it)"),
    ("/layer L", "steer at layer(s) L, e.g. /layer 14 or /layer 12,14-16"),
    ("/vector V", "switch to a vector file, or a trait extracted for this model"),
    ("/steer [SPEC]", "add a plan term (VECTOR[@position]:LAYERS:VALUE[:OP], as --steer); alone: list the plan"),
    ("/unsteer N", "remove plan term N"),
    ("/term N [V]", "make term N the slider the keys move (0: the vector's α), and set its value to V"),
    (
        "/when [SPEC|off]",
        "steer only replies whose prompt passes VECTOR[@position]:LAYER:THRESHOLD (--when); off: drop it",
    ),
    ("/positions M", "where to add: all, prompt (the conversation so far) or response"),
    ("/norm N", "raw, unit or stream: α keeps its push (‖α·v‖), the slider takes that mode's range"),
    ("/reset", "clear the conversation (settings stay)"),
    ("/compare [A,B,…]", "regenerate the last reply at several α, side by side"),
    ("/save", "write the transcript, with each turn's settings, into the workspace"),
    ("/help", "this list"),
    ("/quit", "leave (Ctrl-D too)"),
)


@dataclass
class Outcome:
    """What a slash command did, for either front end to render."""

    message: str = ""
    rows: list[dict[str, Any]] | None = None  # /compare
    help: bool = False
    quit: bool = False
    data: dict[str, Any] = field(default_factory=dict)  # extra JSON fields in line mode

    def json_fields(self) -> dict[str, Any]:
        """The fields line mode's JSON adds after `command`, `ok` and `message`."""
        data = dict(self.data)
        if self.rows is not None:
            data["rows"] = self.rows
        if self.help:
            data["commands"] = [usage for usage, _ in HELP]
        return data


def run_command(session: ChatSession, line: str, stop: threading.Event | None = None) -> Outcome:
    """Apply one slash command to the session; a PersonactlError when it is unknown or invalid.
    `stop` ends a running /compare early (Ctrl-C in the terminal)."""
    name, _, arg = line.strip()[1:].partition(" ")
    handler = _COMMANDS.get(name.lower())
    if handler is None:
        raise InputError(f"unknown command /{name}", hint="/help lists the commands")
    return handler(session, arg.strip(), stop or threading.Event())


def split_line(line: str) -> tuple[str, str]:
    """("command", line) for a slash command, else ("message", text); "//x" sends "/x"."""
    if line.startswith("//"):
        return "message", line[1:]
    return ("command", line) if line.startswith("/") else ("message", line)


def one_line(text: str) -> str:
    """A reply as one output line: backslashes and line breaks escaped (\\\\, \\n, \\r)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def turn_record(turn: ChatTurn) -> dict[str, Any]:
    """A turn as line mode's JSON line: the message, the reply and the steering it used."""
    steering = turn.steering
    return {
        "message": turn.user,
        "reply": turn.reply,
        "alpha": steering["alpha"],
        "layers": steering["layers"],
        "positions": steering["positions"],
        "norm": steering["norm"],
        "vector": steering["vector"],
        "trait": steering["trait"],
        "n_prompt_tokens": turn.n_prompt_tokens,
        "n_tokens": turn.n_tokens,
        "finish_reason": turn.finish_reason,
        "seconds": turn.seconds,
        "conversation": turn.conversation,
        "seed": turn.seed,
        **({"plan": steering["plan"]} if steering.get("plan") else {}),
        **({"when": steering["when"]} if steering.get("when") else {}),
        **({"readout": turn.readout} if turn.readout is not None else {}),
    }


# ---------------------------------------------------------------- one handler per command


def _need(arg: str, usage: str) -> str:
    if not arg:
        raise InputError(f"{usage.split()[0]} needs a value", hint=f"usage: {usage}")
    return arg


def _numbers(arg: str, usage: str) -> list[float]:
    try:
        return [float(part) for part in arg.replace(",", " ").split()]
    except ValueError:
        raise InputError(f"bad number in {arg!r}", hint=f"usage: {usage}") from None


def _alpha(session: ChatSession, arg: str, stop: threading.Event) -> Outcome:
    values = _numbers(_need(arg, "/alpha A"), "/alpha A")
    if len(values) != 1:
        raise InputError(f"/alpha takes one number, not {arg!r}", hint="usage: /alpha A")
    session.set_alpha(values[0])
    return Outcome(f"α = {session.alpha:+.2f} ({session.describe_push()})", data={"alpha": session.alpha})


def _layer(session: ChatSession, arg: str, stop: threading.Event) -> Outcome:
    session.set_layers(parse_ranges(_need(arg, "/layer L")))
    return Outcome(f"layers {format_ranges(session.layers)}", data={"layers": session.layers})


def _vector(session: ChatSession, arg: str, stop: threading.Event) -> Outcome:
    warning = session.set_vector(_need(arg, "/vector FILE_OR_TRAIT"))
    text = f"vector {session.vector.label} ({session.vector.path})"
    return Outcome(text + (f"\nwarning: {warning}" if warning else ""), data={"vector": str(session.vector.path)})


def _plan_outcome(session: ChatSession, message: str) -> Outcome:
    """`message` and the plan as it stands: one line per term, the active one marked."""
    lines = [
        f"{'▸' if session.active == n else ' '} {session.describe_term(n)}" for n in range(1, len(session.plan) + 1)
    ]
    text = "\n".join([message, *lines] if lines else [message, "  (no plan terms)"])
    return Outcome(text.strip("\n"), data={"plan": session.plan_specs(), "active": session.active})


def _steer(session: ChatSession, arg: str, stop: threading.Event) -> Outcome:
    if not arg:
        return _plan_outcome(session, "plan:")
    resolved = session.add_term(arg)
    session.select(len(session.plan))  # the new term's slider is the one the keys move
    warning = f"\nwarning: {resolved.warning}" if resolved.warning else ""
    return _plan_outcome(session, f"added term {len(session.plan)}: {resolved.term.spec()}{warning}")


def _unsteer(session: ChatSession, arg: str, stop: threading.Event) -> Outcome:
    n = _term_number(_need(arg, "/unsteer N"), "/unsteer N")
    term = session.remove_term(n)
    return _plan_outcome(session, f"removed term {n}: {term.spec()}")


def _term(session: ChatSession, arg: str, stop: threading.Event) -> Outcome:
    number, _, value = _need(arg, "/term N [V]").partition(" ")
    n = _term_number(number, "/term N [V]")
    if value.strip():
        values = _numbers(value, "/term N [V]")
        if len(values) != 1:
            raise InputError(f"/term takes one value, not {value.strip()!r}", hint="usage: /term N [V]")
        if n == 0:
            session.set_alpha(values[0])
        else:
            session.set_term_value(n, values[0])
    session.select(n)
    if n == 0:
        return Outcome(
            f"α = {session.alpha:+.2f} ({session.describe_push()})", data={"active": 0, "alpha": session.alpha}
        )
    return _plan_outcome(session, f"term {n}: {session.plan[n - 1].spec()}")


def _term_number(text: str, usage: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise InputError(
            f"bad term number {text.strip()!r}", hint=f"usage: {usage} (the toolbar numbers the terms)"
        ) from None


def _when(session: ChatSession, arg: str, stop: threading.Event) -> Outcome:
    if arg.lower() in ("off", "none"):
        session.set_condition(None)
        return Outcome("no condition: every reply is steered", data={"when": None})
    if arg:
        session.set_condition(arg)
    if session.condition is None:
        return Outcome("no condition (/when SPEC sets one)", data={"when": None})
    spec, last = session.condition.spec.spec(), session.last_condition
    text = f"when {spec}: a reply is steered only when its prompt's projection is above the threshold"
    if last is not None:
        text += f"\nlast prompt: {condition_text(last)}"
    return Outcome(text, data={"when": spec, "last": last})


def condition_text(verdict: dict[str, Any]) -> str:
    """A reply's verdict in words: `projection 2.13: steered`."""
    return f"projection {verdict['projection']:.4g}: {'steered' if verdict['steered'] else 'not steered'}"


def _positions(session: ChatSession, arg: str, stop: threading.Event) -> Outcome:
    session.set_positions(_need(arg, "/positions all|prompt|response"))
    return Outcome(f"positions {session.positions}", data={"positions": session.positions})


def _norm(session: ChatSession, arg: str, stop: threading.Event) -> Outcome:
    session.set_norm(_need(arg, "/norm raw|unit|stream"))
    top, step = session.slider_range()
    text = f"norm {session.norm}: α = {session.alpha:+.3g} ({session.describe_push()}); slider ±{top:g}, step {step:g}"
    return Outcome(text, data={"norm": session.norm, "alpha": session.alpha, "max_alpha": top, "alpha_step": step})


def _reset(session: ChatSession, arg: str, stop: threading.Event) -> Outcome:
    session.reset()
    return Outcome("conversation cleared")


def _compare(session: ChatSession, arg: str, stop: threading.Event) -> Outcome:
    rows = session.compare(_numbers(arg, "/compare [A,B,…]") if arg else None, stop)
    return Outcome(rows=rows, data={"layers": session.layers})


def _save(session: ChatSession, arg: str, stop: threading.Event) -> Outcome:
    path = session.save()
    return Outcome(f"saved {path}", data={"path": str(path)})


_COMMANDS: dict[str, Callable[[ChatSession, str, threading.Event], Outcome]] = {
    "alpha": _alpha,
    "layer": _layer,
    "layers": _layer,
    "vector": _vector,
    "steer": _steer,
    "unsteer": _unsteer,
    "term": _term,
    "when": _when,
    "positions": _positions,
    "norm": _norm,
    "reset": _reset,
    "compare": _compare,
    "save": _save,
    "help": lambda session, arg, stop: Outcome(help=True),
    "quit": lambda session, arg, stop: Outcome(quit=True),
    "exit": lambda session, arg, stop: Outcome(quit=True),
}
