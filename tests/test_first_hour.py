"""Issue 19, the first hour: the chat slider follows the norm mode, Ctrl-C cuts a reply where the
screen shows it, Ctrl-D asks once about unsaved turns, line mode marks failures; `traits new`
against a real loopback server; the plots' bounds; tables that keep their key columns."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from test_traits_new import DraftServer  # a loopback OpenAI-compatible chat server
from typer.testing import CliRunner

from personactl.backends import Sampling
from personactl.chat.session import ChatSession, nice_number, step_for
from personactl.cli.app import app
from personactl.cli.chat import run_lines
from personactl.model.loading import load_model
from personactl.store.vectors import PersonaVector
from personactl.store.workspace import Workspace

runner = CliRunner()
STREAM = 5.0  # the stream norm written into the tiny vector


@pytest.fixture(scope="module")
def model_dir(tiny_factory) -> Path:
    return tiny_factory("llama")


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_model(str(model_dir), dtype="float32", device="cpu", log=lambda m: None)


@pytest.fixture(scope="module")
def vector_path(tmp_path_factory, lm, model_dir) -> Path:
    gen = torch.Generator().manual_seed(0)
    rows = lm.num_layers + 1
    path = tmp_path_factory.mktemp("vec") / "tinymood.safetensors"
    PersonaVector(
        {
            "mean_diff.response_avg": torch.randn(rows, lm.hidden_size, generator=gen) * 3,
            "stream_norm": torch.full((rows,), STREAM),
        },
        {
            "model": str(model_dir),
            "model_fingerprint": lm.fingerprint,
            "num_layers": lm.num_layers,
            "hidden_size": lm.hidden_size,
            "rows": list(range(rows)),
            "positions": ["response_avg"],
            "aggregators": ["mean_diff"],
            "trait": "tinymood",
        },
    ).save(path)
    return path


def session_for(lm, vector_path, tmp_path, **kwargs) -> ChatSession:
    options = dict(layers=[2], alpha=0.0, sampling=Sampling(10, 0.0))
    options.update(kwargs)
    return ChatSession(lm, Workspace(tmp_path / "ws"), str(vector_path), **options)


# ---------------------------------------------------------------- chat: the slider follows /norm


def test_slider_range_and_step_follow_the_norm_mode(lm, vector_path, tmp_path):
    session = session_for(lm, vector_path, tmp_path, alpha=0.1)
    raw_norm = float(session.directions[2].norm())
    assert session.slider_range() == (3.0, 0.25)
    assert session.push()["norm"] == [pytest.approx(0.1 * raw_norm)]
    assert session.push()["stream_share"] == [pytest.approx(0.1 * raw_norm / STREAM)]

    session.set_norm("stream")  # α keeps its push: ‖α·v‖ is (to a fiftieth of a step) unchanged
    assert session.slider_range() == (0.5, 0.05)
    assert session.alpha == pytest.approx(0.1 * raw_norm / STREAM, abs=0.001)
    assert session.push()["norm"] == [pytest.approx(0.1 * raw_norm, abs=0.001 * STREAM)]
    assert session.describe_push().endswith(f"= {session.alpha:.2f}×stream")
    session.nudge_alpha(session.alpha_step)  # off the grid after rescaling: the next multiple first
    assert session.alpha == pytest.approx(0.4) and round(session.alpha / 0.05, 6).is_integer()
    session.nudge_alpha(session.alpha_step)
    session.nudge_alpha(session.alpha_step)
    assert session.alpha == 0.5  # the end of the stream range
    with pytest.raises(Exception, match=r"outside the allowed range ±0.5 \(--norm stream\)"):
        session.set_alpha(1.0)

    session.set_norm("unit")  # α is ‖α·v‖ itself; the range is half the stream norm
    assert session.slider_range() == (nice_number(STREAM / 2), step_for(2.5)) == (2.5, 0.2)
    assert session.alpha == pytest.approx(0.5 * STREAM)
    session.set_norm("raw")
    assert session.alpha == pytest.approx(0.5 * STREAM / raw_norm, abs=0.005)

    fixed = session_for(lm, vector_path, tmp_path, max_alpha=4.0, alpha_step=0.5)  # given: every mode
    fixed.set_norm("stream")
    assert fixed.slider_range() == (4.0, 0.5)


def test_norm_command_reports_the_range_and_the_push(lm, vector_path, tmp_path):
    from personactl.cli.chat import format_alpha, run_command, toolbar

    session = session_for(lm, vector_path, tmp_path, alpha=0.1)
    outcome = run_command(session, "/norm stream")
    assert outcome.data["max_alpha"] == 0.5 and outcome.data["alpha_step"] == 0.05
    assert "slider ±0.5, step 0.05" in outcome.message and "×stream" in outcome.message
    bar = "".join(text for _, text in toolbar(session))
    assert " −0.5 " in bar and " +0.5 " in bar and "×stream" in bar and "±0.05" in bar
    assert format_alpha(0.125, 0.025) == "+0.125" and format_alpha(1, 0.25) == "+1.00"
    narrow = "".join(text for _, text in toolbar(session, 70))  # an 80-column terminal: the keys go first
    assert len(narrow) <= 70 and "×stream" in narrow and "Alt-" not in narrow


# ---------------------------------------------------------------- chat: Ctrl-C cuts where the screen is


def test_a_stopped_reply_keeps_exactly_the_text_shown(lm, vector_path, tmp_path):
    session = session_for(lm, vector_path, tmp_path, sampling=Sampling(200, 0.0))
    stream = session.send("hello world")
    shown = [next(stream) for _ in range(3)]
    stream.stop()  # Ctrl-C: tokens generated meanwhile are not shown, nor recorded
    assert list(stream) == []
    turn = stream.turn
    assert turn.finish_reason == "interrupted" and turn.reply == "".join(shown)
    assert 3 <= turn.n_tokens < 200
    assert session.history[-1] == {"role": "assistant", "content": turn.reply}
    assert session.unsaved == 1
    session.save()
    assert session.unsaved == 0


# ---------------------------------------------------------------- chat: line mode answers every line


def test_line_mode_json_marks_failed_commands_and_messages(lm, vector_path, tmp_path, capsys):
    session = session_for(lm, vector_path, tmp_path)
    too_long = "word " * 300  # over the tiny model's context of 256
    lines = io.StringIO("\n".join(["/alpha 9", "/norm stream", too_long, "/bogus", "hi"]) + "\n")
    assert run_lines(session, lines, as_json=True) == 3
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["ok"] for o in out] == [False, True, False, False, True]
    for failed in (out[0], out[2], out[3]):
        assert failed["error"] and "hint" in failed
    assert out[0]["error"] == "α = 9 is outside the allowed range ±3 (--norm raw)"
    assert "exceeds the model's context" in out[2]["error"] and out[2]["message"] == too_long
    assert out[1]["max_alpha"] == 0.5 and out[4]["norm"] == "stream"


# ---------------------------------------------------------------- chat: the terminal


def chat_args(model_dir, vector, *extra):
    return ["chat", "--vector", str(vector), "--model", str(model_dir), "--dtype", "float32", "-w", "ws",
            "--layers", "2", "--max-new-tokens", "10", *extra]  # fmt: skip


def test_terminal_norm_moves_the_slider_and_ctrl_d_asks_about_unsaved_turns(
    isolated_env, model_dir, vector_path, tmp_path
):
    from test_chat import Terminal

    term = Terminal(chat_args(model_dir, vector_path, "--alpha", "0"), tmp_path)
    term.wait(lambda _: "+3  α +0.00" in term.toolbar(), 60, "the raw slider")
    term.child.send("/norm stream\r")
    term.wait(lambda _: "−0.5 ├" in term.toolbar() and "±0.05" in term.toolbar(), 30, "the stream slider")
    term.child.send(Terminal.ALT_RIGHT)
    term.wait(lambda _: "α +0.05" in term.toolbar() and "= 0.05×stream" in term.toolbar(), 30, "one step")
    term.send_message("hello world")
    term.child.sendcontrol("d")  # one unsaved turn: a word about it, and the chat goes on
    term.wait(lambda t: "1 turn not saved yet: /save writes the transcript" in t, 30, "the unsaved note")
    assert term.child.isalive()
    term.child.sendcontrol("d")  # again: leaves
    term.child.expect(term.pexpect.EOF, timeout=30)
    assert "left without saving 1 turn" in term.child.before
    term.child.close()
    assert term.child.exitstatus == 0


@pytest.mark.slow
def test_ctrl_c_on_the_embedded_model_leaves_no_stray_token(isolated_env, tmp_path):
    """A long reply on SmolLM2 stopped by Ctrl-C: no `^C` on the screen, and the saved reply is
    exactly what the screen shows (no token generated after the key)."""
    from test_chat import Terminal, saved_transcript

    pairs = Path(__file__).parent / "data" / "mood_pairs.jsonl"
    extract = ["extract", "--pairs", str(pairs), "--name", "mood", "-w", "ws", "--layers", "15",
               "--positions", "response_avg", "--aggregators", "mean_diff", "--json"]  # fmt: skip
    result = runner.invoke(app, extract)
    assert result.exit_code == 0, result.output
    args = ["chat", "--vector", "mood", "-w", "ws", "--layers", "15", "--alpha", "0", "--max-new-tokens", "400"]
    term = Terminal(args, tmp_path)
    term.wait(lambda _: "α +0.00" in term.toolbar(), 120, "the slider")
    term.child.send("Write a long story about a dragon who learns to cook.\r")
    term.wait(lambda t: re.search(r"assistant › \S+ \S+ \S+ \S+", t), 120, "the reply to start streaming")
    term.child.sendcontrol("c")
    screen = term.wait(lambda t: "· stopped by Ctrl-C" in t, 60, "the stopped reply")
    assert "^C" not in screen
    shown = re.search(r"assistant › (.*?)\nα \+0\.00 · ", screen, re.S).group(1)
    doc = saved_transcript(term)
    assert term.finish() == 0
    (turn,) = doc["turns"]
    assert turn["finish_reason"] == "interrupted" and 3 <= turn["n_tokens"] < 400
    assert " ".join(turn["reply"].split()) == " ".join(shown.split())  # the screen wraps long lines


# ---------------------------------------------------------------- traits new against a real server


@pytest.fixture
def draft_env(isolated_env, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("PERSONACTL_JUDGE_MAX_RETRIES", "0")
    monkeypatch.setenv("PERSONACTL_JUDGE_MODEL", "drafter-1")
    monkeypatch.setenv("PERSONACTL_JUDGE_API_KEY", "sk-secretsecretsecret")
    return isolated_env


def traits_new(server, *args):
    argv = ["traits", "new", "sure of everything", "--judge-base-url", server.base_url, "-w", "ws", *args]
    return runner.invoke(app, argv, catch_exceptions=False)


def test_traits_new_sends_max_tokens_and_reports_a_cut_draft(draft_env):
    cut = '{"name": "sure", "description": "The assistant never hedges and states every guess as'
    with DraftServer([(cut, "length")]) as server:
        result = traits_new(server, "--max-tokens", "512")
    assert server.requests[0]["max_tokens"] == 512 and len(server.requests) == 1  # no retry: it would be cut too
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "the draft was cut at --max-tokens 512" in flat and "pass a larger --max-tokens (e.g. 1024)" in flat
    (saved,) = (draft_env / "ws" / "drafts").glob("trait-draft-*.txt")
    assert cut in saved.read_text() and saved.name in flat.replace(" ", "")
    assert not (draft_env / "traits").exists()
    with DraftServer([(cut, "length")]) as server:
        traits_new(server)
    assert server.requests[0]["max_tokens"] == 3072  # the default


def test_traits_new_shows_and_saves_a_rejected_reply(draft_env):
    bad = "Sure! Here is a trait: " + "blah " * 200 + "END-OF-REPLY"
    with DraftServer([(bad, "stop"), (bad, "stop")]) as server:
        result = traits_new(server)
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "still invalid after 2 attempts" in flat
    assert f"the last reply ({len(bad)} characters): 'Sure! Here is a trait:" in flat
    assert "END-OF-REPLY" in flat and "blah " * 100 not in flat  # shortened: start … end
    (saved,) = (draft_env / "ws" / "drafts").glob("trait-draft-*.txt")
    text = saved.read_text()
    assert text.count(bad) == 2 and "holds no JSON object" in text  # every attempt, whole, with its errors
    assert "every reply, whole:" in flat and saved.name in flat.replace(" ", "")


def test_traits_new_shows_the_servers_error_message(draft_env):
    said = "The model `drafter-1` does not exist. Try `qwen2.5-7b-instruct`. (Bearer sk-secretsecretsecret)"
    error = {"error": {"message": said, "type": "NotFoundError"}}
    with DraftServer([(404, error)]) as server:
        result = traits_new(server)
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "answered HTTP 404 for model drafter-1" in flat and "Try `qwen2.5-7b-instruct`" in flat
    assert "secretsecret" not in result.output  # credentials the server echoed are masked


# ---------------------------------------------------------------- plots: on the scale, labelled, readable


def synthetic_cells():
    """Cells of a small noisy eval: two samples per cell, so t-intervals reach far past 0–100."""
    import polars as pl

    from personactl.core.eval_summary import summarize

    records = []

    def add(condition, layer, alpha, scores):
        steered = condition in ("steered", "random")
        for trait, coherence in scores:
            records.append(dict(condition=condition, position="response_avg" if steered else None,
                                aggregator="mean_diff" if steered else None, norm_mode="raw" if steered else None,
                                layer=layer, coefficient=float(alpha), trait_score=trait, coherence_score=coherence,
                                kl_neutral=abs(alpha) * 0.3 if steered else 0.0))  # fmt: skip

    add("unsteered", None, 0, [(0, 90), (60, 40)])
    add("prompted", None, 0, [(100, 95), (40, 60)])
    for layer in (8, 12):
        for alpha in (-2, 1, 2):
            add("steered", layer, alpha, [(0, 100), (100, 0)])
            add("random", layer, alpha, [(5, 98), (95, 2)])
    cells, _ = summarize(pl.DataFrame(records, infer_schema_length=None), 50.0, 1.0)
    return cells


def score_axes(fig):
    return [ax for ax in fig.axes if ax.get_ylim() == (-2, 102)]


def test_eval_curves_stay_on_the_score_scale_with_an_alpha_zero_point(tmp_path):
    from matplotlib.collections import PolyCollection

    from personactl.steps.plots import curves_figure, plot_curves

    cells = synthetic_cells()
    for metric in ("trait", "coherence"):  # the table's intervals are clipped too (t alone gives ±600)
        assert cells[f"{metric}_low"].min() == 0 and cells[f"{metric}_high"].max() == 100
    fig = curves_figure(cells, 50.0, "mood · response_avg/mean_diff/raw", 1.0, "model m · judge j · 2 questions")
    axes = score_axes(fig)
    assert len(axes) == 4  # trait and coherence for two layers
    for ax in axes:
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 2  # steered and random, each in its line's colour
        assert len({tuple(c.get_facecolor()[0][:3]) for c in bands}) == 2
        for band in bands:
            ys = [v[1] for path in band.get_paths() for v in path.vertices]
            assert 0 <= min(ys) and max(ys) <= 100, (min(ys), max(ys))
        zero = [ln for ln in ax.lines if 0.0 in list(ln.get_xdata()) and ln.get_markerfacecolor() == "white"]
        assert zero, "no hollow α = 0 (unsteered) point"
    fig.canvas.draw()
    title = fig._suptitle
    assert "model m · judge j" in title.get_text() and "n = 2 responses per cell" in title.get_text()
    assert fig.bbox.contains(*title.get_window_extent().p0) and fig.bbox.contains(*title.get_window_extent().p1)
    png = plot_curves(cells, 50.0, tmp_path / "curves.png", "mood", 1.0, "model m")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_heatmap_colourbars_are_labelled_and_alpha_zero_is_a_column():
    from personactl.steps.plots import heatmap_figure

    fig = heatmap_figure(synthetic_cells(), 50.0, "mood", "model m · judge j")
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert [ax.get_ylabel() for ax in bars] == ["mean trait score (0–100)", "mean coherence score (0–100)"]
    main = [ax for ax in fig.axes if ax not in bars]
    assert [t.get_text() for t in main[0].get_xticklabels()] == ["-2", "0", "1", "2"]


def test_proxy_title_fits_and_d_has_its_interval_and_n():
    from matplotlib.collections import PolyCollection

    from personactl.core.stats import cohens_d_interval
    from personactl.steps.plots import proxy_figure
    from personactl.steps.proxy import PROXY_LABEL

    rows = [dict(layer=layer, cohens_d=0.1 * layer, n_pos=12, n_neg=10) for layer in range(1, 13)]
    fig = proxy_figure(rows, f"optimistic · response_avg/mean_diff · {PROXY_LABEL}", "model smollm2-135m")
    fig.canvas.draw()
    title = fig._suptitle
    extent = title.get_window_extent()
    assert fig.bbox.x0 <= extent.x0 and extent.x1 <= fig.bbox.x1 and extent.y1 <= fig.bbox.y1  # not clipped
    assert "n = 12 pos and 10 neg" in title.get_text() and "no steering" in title.get_text()
    (band,) = [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]
    ys = [v[1] for path in band.get_paths() for v in path.vertices]
    low, high = cohens_d_interval(1.2, 12, 10)
    assert min(ys) <= low < 1.2 < high <= max(ys)


def test_compare_plot_numbers_do_not_overlap():
    from personactl.steps.plots import cosines_figure

    specs = [f"trait-number-{i}@response_avg" for i in range(10)]
    pairs = [{"a": a, "b": b, "cosine": [0.5, -0.2, 0.1], "mean_cosine": 0.13}
             for i, a in enumerate(specs) for b in specs[i + 1 :]]  # fmt: skip
    fig = cosines_figure({"model": "m", "layers": [1, 2, 3], "pairs": pairs, "vectors": [{"spec": s} for s in specs]})
    fig.canvas.draw()
    matrix = [ax for ax in fig.axes if ax.get_title() == "mean cosine over layers"][0]
    boxes = [t.get_window_extent() for t in matrix.texts]
    assert len(boxes) == 100
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b)
    bar = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"][0]
    assert bar.get_ylabel() == "cosine similarity"


# ---------------------------------------------------------------- tables: nothing cut, at any width


def wide_vector(path: Path, lm, model_dir) -> Path:
    """A vector file with eight directions (two aggregators × four positions), as `extract` writes."""
    gen = torch.Generator().manual_seed(5)
    rows = lm.num_layers + 1
    positions = ["prompt_end", "response_start", "response_avg", "prompt_avg"]
    tensors = {f"{a}.{p}": torch.randn(rows, lm.hidden_size, generator=gen) * 37 for a in ("mean_diff", "pca")
               for p in positions}  # fmt: skip
    tensors["stream_norm"] = torch.full((rows,), 123.456)
    info = {"model": str(model_dir), "model_fingerprint": lm.fingerprint, "num_layers": lm.num_layers,
            "hidden_size": lm.hidden_size, "rows": list(range(rows)), "positions": positions,
            "aggregators": ["mean_diff", "pca"], "trait": "widemood"}  # fmt: skip
    PersonaVector(tensors, info).save(path)
    return path


@pytest.mark.parametrize("columns", ["80", "200"])
def test_show_compare_ls_and_traits_list_cut_nothing(isolated_env, lm, model_dir, vector_path, columns):
    from personactl.store.readout_file import Readout

    wide = wide_vector(isolated_env / "widemood.safetensors", lm, model_dir)
    env = {"COLUMNS": columns}
    shown = runner.invoke(app, ["show", str(wide)], env=env)
    assert shown.exit_code == 0, shown.output
    assert "…" not in shown.stdout
    vector = PersonaVector.load(wide)
    for name in ("mean_diff.prompt_avg", "pca.response_start"):
        assert f"{float(vector.tensors[name][2].norm()):.4f}" in shown.stdout
    table_lines = [line for line in shown.stdout.splitlines() if line[:1] in "│┃┏┡└"]
    assert table_lines and max(map(len, table_lines)) <= int(columns)

    specs = [f"{wide}@{p}/{a}" for a in ("mean_diff", "pca") for p in ("response_avg", "prompt_avg")]
    compared = runner.invoke(app, ["compare", *specs], env=env)
    assert compared.exit_code == 0, compared.output
    assert "…" not in compared.stdout
    if columns == "80":  # the names do not fit: letters, with a key to them
        assert f"A = {specs[0]}" in compared.stdout and "cos A" in compared.stdout

    ws = isolated_env / "personactl-workspace"
    readouts = ws / lm.source.slug / "readouts"
    readouts.mkdir(parents=True)
    tensors = {"vectors.1": torch.ones(2, lm.hidden_size), "center.1": torch.zeros(lm.hidden_size)}
    Readout(tensors, {**lm.describe(), "concepts": ["calm", "angry"], "rows": [1]}).save(readouts / "moods.safetensors")
    listing = runner.invoke(app, ["ls"], env=env)
    assert listing.exit_code == 0, listing.output
    assert "readout" in listing.stdout and "concepts=2" in listing.stdout and "…" not in listing.stdout
    path_cells = [line.split("│")[-2].strip() for line in listing.stdout.splitlines() if line.startswith("│")]
    assert "".join(path_cells) == f"{lm.source.slug}/readouts/moods.safetensors"  # folded, whole
    as_json = json.loads(runner.invoke(app, ["ls", "--json"]).stdout)
    assert [a["kind"] for a in as_json["artifacts"]] == ["readout"]

    traits = runner.invoke(app, ["traits", "list"], env=env)
    assert traits.exit_code == 0 and "…" not in traits.stdout
    assert "misfortune." in traits.stdout  # evil's whole first sentence, wrapped, not cut at 80 characters


# ---------------------------------------------------------------- help pages: one form throughout


def test_help_pages_show_arguments_and_defaults_in_one_form():
    from test_help import PATHS

    for path in PATHS:
        out = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"}).output
        usage = next(line for line in out.splitlines() if "Usage:" in line)
        assert "{" not in usage, usage  # typer's `{vector}`: shown as VECTOR
        assert ". (default:" not in " ".join(out.split()), (path, out)  # "… (default: X)." everywhere
    out = runner.invoke(app, ["show", "--help"], env={"COLUMNS": "200"}).output
    assert "personactl show [OPTIONS] VECTOR" in out
    chat = " ".join(runner.invoke(app, ["chat", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "stream ±0.5" in chat and "--alpha-step" in chat


# ---------------------------------------------------------------- no library warnings for a person


@pytest.mark.slow
def test_steer_on_the_embedded_model_prints_no_library_warning(isolated_env):
    """With every warning shown (PYTHONWARNINGS=default), steering SmolLM2 writes only its progress
    to stderr: no transformers FutureWarning (`past_key_values is deprecated`) or other noise."""
    import os
    import subprocess
    import sys

    pairs = Path(__file__).parent / "data" / "mood_pairs.jsonl"
    extract = ["extract", "--pairs", str(pairs), "--name", "mood", "-w", "ws", "--layers", "15",
               "--positions", "response_avg", "--aggregators", "mean_diff", "--json"]  # fmt: skip
    assert runner.invoke(app, extract).exit_code == 0
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    args = ["steer", "--vector", "mood", "-w", "ws", "--layers", "15", "--coefficients=-1,0,1",
            "--max-new-tokens", "8", "--prompt", "How was your day?"]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "personactl", *args], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "deprecated" not in result.stderr, result.stderr
