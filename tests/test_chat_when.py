"""`personactl chat --when` and `/when`: before each reply the prompt's projection on a condition
vector is read (the whole templated conversation, last prompt token, as `steer --when` reads it);
below the threshold the reply is exactly the unsteered one, above it exactly the steered one (tiny
model, float32, greedy). The verdict shows in the turn, line mode, the toolbar and the transcript."""

from __future__ import annotations

import json

import pytest
import torch
from test_chat import NEW_TOKENS, no_hooks
from test_chat_plans import write_vector
from typer.testing import CliRunner

from personactl.backends import Sampling
from personactl.chat.commands import one_line, run_command, turn_record
from personactl.chat.session import ChatSession
from personactl.cli.app import app
from personactl.cli.chat import toolbar
from personactl.errors import PersonactlError, VectorFileError
from personactl.model.chat_format import encode_prompt
from personactl.model.loading import load_model
from personactl.steps.condition import prompt_projections, resolve_condition
from personactl.store.workspace import Workspace

runner = CliRunner()
MESSAGE = "hello world"
STEERING = dict(alpha=2.0, plan=["othermood:1:1.5"])  # α·v and a plan: the gate covers both


@pytest.fixture(scope="module")
def model_dir(tiny_factory):
    return tiny_factory("llama")


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_model(str(model_dir), dtype="float32", device="cpu", log=lambda m: None)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, lm, model_dir) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    for seed, trait in enumerate(("tinymood", "othermood")):
        path = ws.vectors_path(lm.source.slug, trait, "model")
        path.parent.mkdir(parents=True)
        write_vector(path, lm, str(model_dir), trait, seed)
    return ws


def session_for(lm, ws, **kwargs) -> ChatSession:
    options = dict(layers=[2], alpha=0.0, max_alpha=3.0, sampling=Sampling(NEW_TOKENS, 0.0))
    return ChatSession(lm, ws, "tinymood", **{**options, **kwargs})


def projection(lm, ws, messages) -> float:
    """The gate's reading, done by hand: `steps.condition` on the templated conversation."""
    condition = resolve_condition("othermood:2:0", workspace=ws, lm=lm, position="response_avg", aggregator="mean_diff")
    prompt = encode_prompt(lm.tokenizer, messages)
    return prompt_projections(lm, [prompt], {2: condition.unit})[2][0]


@pytest.fixture(scope="module")
def replies(lm, ws):
    """The unsteered and the steered reply to MESSAGE (no condition), and MESSAGE's projection."""
    unsteered = session_for(lm, ws).reply(MESSAGE)
    steered = session_for(lm, ws, **STEERING).reply(MESSAGE)
    assert steered.reply != unsteered.reply  # the steering changes this reply: the gate has work to do
    return unsteered, steered, projection(lm, ws, [{"role": "user", "content": MESSAGE}])


def same(a, b) -> bool:
    return (a.reply, a.n_tokens, a.finish_reason) == (b.reply, b.n_tokens, b.finish_reason)


def tokens(session) -> list[int]:
    """Every token the engine generated for MESSAGE (end of turn included)."""
    stream = session.send(MESSAGE)
    for _ in stream:
        pass
    return stream._tokens.token_ids


def test_below_the_threshold_the_reply_is_unsteered_above_it_steered(lm, ws, replies):
    unsteered, steered, p = replies
    gated = session_for(lm, ws, **STEERING, when=f"othermood:2:{p + 1e-3!r}")
    assert tokens(gated) == tokens(session_for(lm, ws)) != tokens(session_for(lm, ws, **STEERING))  # bit for bit
    below = gated.transcript[-1]
    assert same(below, unsteered)
    assert below.steering["when"] == {"spec": f"othermood:2:{p + 1e-3!r}", "projection": p, "steered": False}
    above = session_for(lm, ws, **STEERING, when=f"othermood:2:{p - 1e-3!r}").reply(MESSAGE)
    assert same(above, steered) and above.steering["when"]["steered"] is True
    assert above.steering["when"]["projection"] == p
    assert above.steering["alpha"] == below.steering["alpha"] == 2.0  # the settings stay; the gate decides
    assert no_hooks(lm)


def test_the_reading_is_the_whole_conversation_and_each_reply_decides_anew(lm, ws, replies):
    _, _, p = replies
    session = session_for(lm, ws, **STEERING, when=f"othermood:2:{p!r}")  # p itself is not above p
    first = session.reply(MESSAGE)
    assert first.steering["when"]["steered"] is False and first.steering["when"]["projection"] == p
    second = session.reply("tell me about your plans")
    expected = projection(lm, ws, session.messages()[:-1])  # the two turns' conversation, generation prompt
    assert second.steering["when"]["projection"] == expected != p
    assert session.last_condition == second.steering["when"]
    # the second reply, gated out or in, equals the same conversation's reply without steering, or with it
    reference = session_for(lm, ws, **(STEERING if expected > p else {}))
    reference.history = session.history[:2]
    assert same(second, reference.reply("tell me about your plans"))


def test_when_commands_set_show_and_drop_the_condition(lm, ws, replies):
    unsteered, steered, p = replies
    session = session_for(lm, ws, **STEERING)
    outcome = run_command(session, f"/when othermood:2:{p + 1!r}")
    assert outcome.data == {"when": f"othermood:2:{p + 1!r}", "last": None}
    assert same(session.reply(MESSAGE), unsteered)
    shown = run_command(session, "/when")
    assert "not steered" in shown.message and shown.data["last"]["projection"] == p
    assert f" when othermood:2:{p + 1!r} · last {p:.3g} not steered " in [part for _, part in toolbar(session)]
    for bad, needle in [("othermood:x:1", "bad layer 'x'"), ("othermood:9:1", "out of range"), ("nope:2:1", "nope")]:
        with pytest.raises(PersonactlError, match=needle):
            run_command(session, f"/when {bad}")
    assert session.condition.spec.spec() == f"othermood:2:{p + 1!r}"  # a refused condition changes nothing
    assert run_command(session, "/when off").data == {"when": None}
    session.reset()
    turn = session.reply(MESSAGE)
    assert same(turn, steered) and "when" not in turn.steering and "when" not in turn_record(turn)
    assert not any("when" in part for _, part in toolbar(session))


def test_compare_follows_the_gate(lm, ws, replies):
    unsteered, _, p = replies
    session = session_for(lm, ws, alpha=2.0, when=f"othermood:2:{p + 1!r}")
    session.reply(MESSAGE)
    rows = session.compare([-2.0, 2.0])
    assert [row["reply"] for row in rows] == [unsteered.reply] * 2
    assert session.transcript[-1].compare[0]["steering"]["when"]["steered"] is False


def test_the_transcript_and_line_record_hold_the_verdict(lm, ws, replies, tmp_path):
    _, _, p = replies
    session = session_for(lm, ws, **STEERING, when=f"othermood:2:{p - 1!r}")
    turn = session.reply(MESSAGE)
    assert turn_record(turn)["when"] == {"spec": f"othermood:2:{p - 1!r}", "projection": p, "steered": True}
    saved = json.loads(session.save().read_text())
    assert saved["turns"][0]["steering"]["when"] == turn_record(turn)["when"]


def test_a_condition_vector_for_another_model_is_refused(lm, ws, tmp_path, model_dir):
    wide = write_vector(tmp_path / "wide.safetensors", lm, str(model_dir), "wide", 0)
    from personactl.store.vectors import PersonaVector

    vector = PersonaVector.load(wide)
    vector.tensors = {k: torch.zeros(v.shape[0], 48) if v.dim() == 2 else v for k, v in vector.tensors.items()}
    vector.metadata = {**vector.metadata, "hidden_size": 48, "model": "some/other-model"}
    vector.save(wide)
    with pytest.raises(VectorFileError, match="does not fit"):
        session_for(lm, ws, when=f"{wide}:2:0")


# ---------------------------------------------------------------- the command


def chat(model_dir, ws, *extra, lines=(MESSAGE,)):
    args = ["chat", "--vector", "tinymood", "--model", str(model_dir), "--dtype", "float32", "-w", str(ws.root)]
    args += ["--layers", "2", "--max-new-tokens", str(NEW_TOKENS), *extra]
    return runner.invoke(app, args, "\n".join([*lines, ""]))


def test_line_mode_shows_the_verdict(isolated_env, model_dir, ws, replies):
    unsteered, steered, p = replies
    result = chat(model_dir, ws, "--alpha", "2", "--steer", "othermood:1:1.5", "--when", f"othermood:2:{p + 1!r}")
    assert result.exit_code == 0, result.output
    assert result.stdout == one_line(unsteered.reply) + "\n"
    assert f"when othermood:2:{p + 1!r}: projection {p:.4g}: not steered" in result.stderr
    lines = [f"/when othermood:2:{p - 1!r}", MESSAGE, "/when off", "/reset", MESSAGE]
    result = chat(model_dir, ws, "--alpha", "2", "--steer", "othermood:1:1.5", "--json", lines=lines)
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert out[0]["when"] == f"othermood:2:{p - 1!r}"
    assert out[1]["reply"] == steered.reply and out[1]["when"]["steered"] is True
    assert out[1]["when"]["projection"] == p
    assert out[2] == {
        "command": "/when off",
        "ok": True,
        "message": "no condition: every reply is steered",
        "when": None,
    }
    assert out[4]["reply"] == steered.reply and "when" not in out[4]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [("othermood:x:1", "bad layer 'x'"), ("othermood:2:abc", "bad threshold 'abc'"), ("othermood:9:1", "out of range")],
)
def test_bad_conditions_exit_2(isolated_env, model_dir, ws, spec, needle):
    result = chat(model_dir, ws, "--when", spec, lines=())
    assert result.exit_code == 2 and needle in result.output, result.output


def test_vllm_refuses_when_before_starting(isolated_env, model_dir, ws, monkeypatch):
    import personactl.backends as backends

    started = []
    monkeypatch.setattr(backends, "open_model", lambda *a, **k: started.append(1))
    result = chat(model_dir, ws, "--when", "othermood:2:0", "--backend", "vllm", lines=())
    assert result.exit_code == 2 and "--when reads each prompt's activations" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 2 and not started  # one line + hint, no engine


def test_the_terminal_turn_line_says_the_verdict(lm, ws, replies, capsys):
    from rich.console import Console

    from personactl.cli.chat import _stream_reply

    _, _, p = replies
    console = Console(record=True, width=200, force_terminal=False)
    session = session_for(lm, ws, **STEERING, when=below(p))
    _stream_reply(console, session.send(MESSAGE))
    assert f"α +2.00 · plan of 1 term · when {below(p)}: projection {p:.4g}: not steered · " in console.export_text()


def below(p: float) -> str:
    return f"othermood:2:{p + 1!r}"
