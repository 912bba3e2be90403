"""`personactl chat` with a steering plan: `--steer`, `/steer`, `/unsteer`, `/term` and one slider per
term, on the tiny model in float32 (greedy), checked exactly against `Steerer` + `generate` with the
same resolved plan, and in the terminal through the real keys."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from test_chat import NEW_TOKENS, Terminal, no_hooks, saved_transcript
from test_serve import write_vector as write_serve_vector
from typer.testing import CliRunner

from personactl.backends import Sampling
from personactl.backends.hf import stop_token_ids
from personactl.chat.commands import run_command
from personactl.chat.session import ChatSession
from personactl.cli.app import app
from personactl.cli.chat import toolbar
from personactl.errors import InputError, VectorFileError
from personactl.model.chat_format import encode_prompt
from personactl.model.loading import load_model
from personactl.model.steering import Steerer
from personactl.steps.plan import resolve_plan
from personactl.store.vectors import PersonaVector
from personactl.store.workspace import Workspace

runner = CliRunner()
MESSAGE = "hello world"


@pytest.fixture(scope="module")
def model_dir(tiny_factory):
    return tiny_factory("llama")


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_model(str(model_dir), dtype="float32", device="cpu", log=lambda m: None)


def write_vector(path, lm, spec, trait, seed):
    """A vector file as `extract` writes it, for `trait` (test_serve's, renamed)."""
    write_serve_vector(path, lm, spec, seed=seed)
    vector = PersonaVector.load(path)
    PersonaVector(vector.tensors, {**vector.metadata, "trait": trait}).save(path)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory, lm, model_dir) -> Workspace:
    """A workspace with two traits extracted for the tiny model: tinymood and othermood (directions
    small next to its residual stream, so that each plan gives its own readable reply)."""
    ws = Workspace(tmp_path_factory.mktemp("ws"))
    for seed, trait in enumerate(("tinymood", "othermood")):
        path = ws.vectors_path(lm.source.slug, trait, "model")
        path.parent.mkdir(parents=True)
        write_vector(path, lm, str(model_dir), trait, seed)
    return ws


@pytest.fixture
def make_session(lm, ws):
    def make(vector="tinymood", **kwargs):
        options = dict(layers=[2], alpha=0.0, max_alpha=3.0, sampling=Sampling(NEW_TOKENS, 0.0))
        options.update(kwargs)
        return ChatSession(lm, ws, vector, **options)

    return make


def reference(lm, ws, specs=(), vector_steering=None, message=MESSAGE):
    """Greedy `generate` of a one-turn chat under `Steerer` with the plan `specs` resolved as `steer
    --steer` resolves it (and α·v when given): the ground truth. On a model a server shares, it
    first waits for the server's last batch to take its hooks off (they would steer this run too)."""
    from test_serve import no_hooks as no_hooks_within
    from transformers import GenerationConfig

    assert no_hooks_within(lm)

    plan = resolve_plan(list(specs), workspace=ws, lm=lm, position="response_avg", aggregator="mean_diff", norm="raw")
    prompt = encode_prompt(lm.tokenizer, [{"role": "user", "content": message}])
    ids = torch.tensor([prompt])
    stops = stop_token_ids(lm.model, lm.tokenizer)
    config = GenerationConfig(
        max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stops, pad_token_id=lm.tokenizer.pad_token_id
    )
    steering = dict(vector_steering or dict(vector={}, coefficient=0.0))
    steerer = Steerer(lm.model, **steering, plan=plan.by_layer()) if specs or vector_steering else None
    with torch.no_grad(), steerer or contextlib.nullcontext():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    tokens = out[0, len(prompt) :].tolist()
    cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return lm.tokenizer.decode(tokens[:cut], skip_special_tokens=True)


def fresh_reply(session, message=MESSAGE) -> str:
    """A one-turn reply (the conversation is reset first, so every reply answers the same prompt)."""
    session.reset()
    return session.reply(message).reply


# ---------------------------------------------------------------- the engine, exactly


def test_steer_then_unsteer_changes_and_restores_the_reply(make_session, lm, ws):
    session = make_session()
    unsteered = fresh_reply(session)
    assert unsteered == reference(lm, ws)

    run_command(session, "/steer othermood:2:0:ablate")
    ablated = fresh_reply(session)
    assert ablated == reference(lm, ws, ["othermood:2:0:ablate"]) != unsteered

    outcome = run_command(session, "/steer tinymood:1-2:2")
    assert outcome.data == {"plan": ["othermood:2:0:ablate", "tinymood:1-2:2:add"], "active": 2}
    both = fresh_reply(session)
    assert both == reference(lm, ws, ["othermood:2:0:ablate", "tinymood:1-2:2"])
    assert len({unsteered, ablated, both}) == 3

    run_command(session, "/unsteer 1")
    assert session.plan_specs() == ["tinymood:1-2:2:add"]
    assert fresh_reply(session) == reference(lm, ws, ["tinymood:1-2:2"])
    run_command(session, "/unsteer 1")
    assert fresh_reply(session) == unsteered  # no plan left: exactly the unsteered reply again

    steering = [turn.steering for turn in session.transcript]
    assert [s.get("plan") for s in steering] == [
        None,
        ["othermood:2:0:ablate"],
        ["othermood:2:0:ablate", "tinymood:1-2:2:add"],
        ["tinymood:1-2:2:add"],
        None,
    ]
    assert steering[2]["plan_terms"][1]["applied"] == {"1": 2.0, "2": 2.0}
    assert no_hooks(lm)


def test_a_plan_add_beside_the_vector_alpha_equals_their_sum(make_session, lm, ws):
    """α·v of the session's vector, then the plan: an add of the same vector at the same layer sums."""
    vector = PersonaVector.load(ws.vectors_path(lm.source.slug, "tinymood", "model"))
    session = make_session(alpha=1.0, plan=["tinymood:2:0.5"])
    expected = reference(lm, ws, vector_steering=dict(vector={2: vector.direction(2)}, coefficient=1.5))
    assert fresh_reply(session) == expected == reference(lm, ws, ["tinymood:2:1.5"])
    assert fresh_reply(session) != fresh_reply(make_session(alpha=1.0))


def test_sliders_move_the_active_term_only_and_resolve_it_alone(make_session, lm, ws):
    session = make_session(alpha=1.0, plan=["tinymood:1:1", "othermood:2:0.5:cap"])
    assert session.sliders() == [0, 1, 2] and session.active == 0
    session.nudge(+1)  # the vector's α, as the single slider always did
    assert session.alpha == 1.25 and session.plan_specs() == ["tinymood:1:1:add", "othermood:2:0.5:cap"]
    assert session.switch() == 1
    first, second = session._resolved
    session.nudge(+1)
    assert session.plan_specs() == ["tinymood:1:1.25:add", "othermood:2:0.5:cap"] and session.alpha == 1.25
    assert session.switch() == 2
    session.nudge(-1)
    assert session.term_range(2) == (None, 0.2)  # a 24th of the stream norm (5), rounded
    assert session.plan[1].value == 0.4  # to the next multiple of the step below
    session.zero()
    assert session.plan_specs() == ["tinymood:1:1.25:add", "othermood:2:0:cap"]
    assert session.switch() == 0 and session.switch(-1) == 2  # round the sliders, both ways

    reply = fresh_reply(session)
    assert session._resolved[0] is not first and session._resolved[1] is not second  # both values changed
    session.switch(-1)  # term 1
    session.nudge(-1)
    kept = session._resolved[1]
    fresh_reply(session)
    assert session._resolved[1] is kept  # only the term whose value changed is resolved again
    session.nudge(+1)
    assert fresh_reply(session) == reply  # back to the same values: the same reply
    vector = PersonaVector.load(ws.vectors_path(lm.source.slug, "tinymood", "model"))
    expected = reference(
        lm,
        ws,
        ["tinymood:1:1.25", "othermood:2:0:cap"],
        vector_steering=dict(vector={2: vector.direction(2)}, coefficient=1.25),
    )
    assert reply == expected

    session.select(1)  # an add term's slider stops at the end of its range, as α's does
    for _ in range(20):
        session.nudge(+1)
    assert session.plan[0].value == 3.0 and session.alpha == 1.25


def test_term_command_selects_and_sets(make_session):
    session = make_session(plan=["tinymood:1:1"])
    outcome = run_command(session, "/term 1 -2")
    assert session.active == 1 and session.plan_specs() == ["tinymood:1:-2:add"]
    assert "▸ 1 tinymood add@1 α -2" in outcome.message
    run_command(session, "/term 0 0.5")
    assert session.active == 0 and session.alpha == 0.5
    listing = run_command(session, "/steer")
    assert listing.message.splitlines() == ["plan:", "  1 tinymood add@1 α -2"]


def test_toolbar_shows_every_term_and_the_active_slider(make_session):
    session = make_session(alpha=1.0, plan=["tinymood:1:1", "othermood:2:0.5:cap"])
    text = "".join(part for _, part in toolbar(session))
    assert "α +1.00" in text and "1 tinymood add@1 α +1" in text and "2 othermood cap@2 τ +0.5" in text
    assert "Alt-↑/↓ slider" in text
    session.select(1)
    parts = toolbar(session)
    assert ("class:alpha", " 1 tinymood add@1 α +1 ") in parts  # the active term is highlighted
    assert "term 1: α +1.00" in "".join(part for _, part in parts) and "├" in parts[1][1]
    session.select(2)
    assert toolbar(session)[0] == ("class:alpha", " term 2: τ +0.50 ")  # unbounded: no bar
    narrow = "".join(part for _, part in toolbar(session, width=30))
    assert narrow.startswith(" term 2: τ +0.50 ") and "Alt-" not in narrow


def test_bad_terms_are_one_line_and_the_chat_goes_on(make_session, lm, ws):
    session = make_session(plan=["tinymood:1:1"])
    for line, error, needle in [
        ("/steer nosuchtrait:2:1", VectorFileError, "no vectors for 'nosuchtrait'"),
        ("/steer tinymood:9:1", InputError, "out of range"),
        ("/steer tinymood:2:5", InputError, "--steer tinymood:2:5:add: α = 5 is outside the allowed range ±3"),
        ("/steer tinymood:2:x", InputError, "bad value 'x'"),
        ("/steer tinymood:2:p25:cap", InputError, "as a percentile"),
        ("/unsteer 2", InputError, "no plan term 2 (the plan has terms 1-1)"),
        ("/unsteer x", InputError, "bad term number 'x'"),
        ("/term 3", InputError, "no plan term 3"),
        ("/term 1 99", InputError, "outside the allowed range ±3"),
    ]:
        with pytest.raises(error) as info:
            run_command(session, line)
        assert needle in info.value.message and "\n" not in info.value.message, line
    assert session.plan_specs() == ["tinymood:1:1:add"] and session.active == 0
    assert fresh_reply(session) == reference(lm, ws, ["tinymood:1:1"])


def test_a_plan_alone_without_a_vector(make_session, lm, ws):
    session = make_session(vector=None, alpha=1.0, plan=["othermood:2:0:ablate"])
    assert session.alpha == 0.0 and session.sliders() == [1] and session.active == 0
    assert session.switch() == 1
    assert fresh_reply(session) == reference(lm, ws, ["othermood:2:0:ablate"])
    with pytest.raises(InputError, match="no vector to set α for"):
        run_command(session, "/alpha 1")
    path = session.save()
    assert path.parent.name == "othermood"  # named after the plan's first vector
    assert json.loads(path.read_text())["turns"][0]["steering"]["plan"] == ["othermood:2:0:ablate"]
    run_command(session, "/unsteer 1")
    assert fresh_reply(session) == reference(lm, ws)
    assert "no vector" in "".join(part for _, part in toolbar(session))


# ---------------------------------------------------------------- the command line


def chat_args(model_dir, ws, *extra):
    common = ["--model", str(model_dir), "-w", str(ws.root), "--dtype", "float32"]
    return ["chat", *common, "--max-new-tokens", str(NEW_TOKENS), *extra]


def test_line_mode_with_a_plan(isolated_env, model_dir, ws, lm):
    lines = f"{MESSAGE}\n/steer tinymood:2:2\n/reset\n{MESSAGE}\n/unsteer 2\n/steer bogus:2:1\n/reset\n{MESSAGE}\n"
    result = runner.invoke(app, chat_args(model_dir, ws, "--steer", "othermood:2:0:ablate", "--json"), lines)
    assert result.exit_code == 2, result.output  # one line failed; every line was processed
    out = [json.loads(line) for line in result.stdout.splitlines()]
    replies = [o for o in out if "reply" in o]
    assert [r["plan"] for r in replies] == [
        ["othermood:2:0:ablate"],
        ["othermood:2:0:ablate", "tinymood:2:2:add"],
        ["othermood:2:0:ablate"],
    ]
    assert replies[0]["reply"] == replies[2]["reply"] == reference(lm, ws, ["othermood:2:0:ablate"])
    assert replies[1]["reply"] == reference(lm, ws, ["othermood:2:0:ablate", "tinymood:2:2"])
    assert replies[0]["vector"] is None and replies[0]["alpha"] == 0.0
    failed = [o for o in out if o.get("ok") is False]
    assert len(failed) == 1 and "no vectors for 'bogus'" in failed[0]["error"]


def test_bad_plan_options_exit_2(isolated_env, model_dir, ws):
    for extra, needle in [
        ([], "nothing to steer with"),
        (["--steer", "tinymood:2:x"], "bad value 'x'"),
        (["--steer", "nosuchtrait:2:1"], "no vectors for 'nosuchtrait'"),
        (["--steer", "tinymood:2:1", "--readout", "vector"], "--readout vector reads the projection on --vector"),
    ]:
        result = runner.invoke(app, chat_args(model_dir, ws, *extra), "hi\n")
        assert result.exit_code == 2 and needle in result.output, (extra, result.output)
        assert result.stdout == ""


def test_terminal_keys_switch_and_move_a_term(isolated_env, model_dir, ws, tmp_path):
    args = chat_args(model_dir, ws, "-v", "tinymood", "--alpha", "0", "--steer", "othermood:2:1", "--layers", "1")
    term = Terminal(args, tmp_path)
    term.wait_alpha(0.0, 3.0)
    term.child.send("\x1b[1;3B")  # Alt-↓: the next slider, plan term 1
    term.wait(lambda _: "term 1: α +1.00" in term.toolbar(), 30, "term 1 active")
    term.child.send(Terminal.ALT_RIGHT + Terminal.ALT_RIGHT)
    term.wait(lambda _: "term 1: α +1.50" in term.toolbar(), 30, "term 1 at 1.5")
    term.child.send("\x1b[1;3A")  # Alt-↑: back to α, which did not move
    term.wait_alpha(0.0, 3.0)
    term.send_message(MESSAGE)
    assert "α +0.00 · plan of 1 term · " in term.text
    doc = saved_transcript(term)
    assert doc["turns"][0]["steering"]["plan"] == ["othermood:2:1.5:add"]
    assert doc["turns"][0]["steering"]["alpha"] == 0.0
    assert term.finish() == 0


def test_caps_from_data_show_and_move_as_percentiles(make_session, lm, ws):
    """A cap at a percentile (`pNN`) or at the file's saved thresholds has no single number: the
    toolbar shows `p90` / `saved`, a nudge moves the percentile by one (the saved one stays), and
    the reply is the plan's as `steer --steer` resolves it."""
    path = ws.vectors_path(lm.source.slug, "tinymood", "model")
    vector = PersonaVector.load(path)
    tensors = dict(vector.tensors)
    rows = vector.tensors["mean_diff.response_avg"].shape[0]
    tensors["quantiles.neg.mean_diff.response_avg"] = torch.linspace(-2, 2, 101).repeat(rows, 1)
    capped = ws.vectors_path(lm.source.slug, "capmood", "model")
    capped.parent.mkdir(parents=True, exist_ok=True)
    metadata = {**vector.metadata, "trait": "capmood", "cap_thresholds": {"rows": {"2": 0.25}, "unit": "projection"}}
    PersonaVector(tensors, metadata).save(capped)

    session = make_session(plan=["capmood:2:p90:cap", "capmood:2:saved:cap"])
    assert session.describe_term(1).endswith("cap@2 τ p90") and session.describe_term(2).endswith("cap@2 τ saved")
    session.select(1)
    assert "term 1: τ p90" in "".join(part for _, part in toolbar(session))
    session.nudge(+1)
    session.select(2)
    session.nudge(+1)
    assert session.plan_specs() == ["capmood:2:p91:cap", "capmood:2:saved:cap"]
    assert fresh_reply(session) == reference(lm, ws, ["capmood:2:p91:cap", "capmood:2:saved:cap"])
