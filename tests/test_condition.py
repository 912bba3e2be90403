"""Conditional steering (`steer --when`) and `condition fit`: the spec grammar, the F1 threshold
scan, a gated-out prompt answered exactly as unsteered, a passing prompt exactly as steered, and
the fit command's `--when` usable as it is."""

from __future__ import annotations

import json

import pytest
from test_cli import expect_error, invoke, isolated_extraction

from personactl.core.condition_fit import baseline_f1, best_threshold, f1_of, threshold_text
from personactl.core.condition_spec import ConditionSpec, parse_condition
from personactl.errors import InputError
from personactl.model.chat_format import chat_messages, encode_prompt
from personactl.model.loading import load_model
from personactl.steps.condition import prompt_projections, resolve_condition
from personactl.steps.condition_fit import trait_prompts
from personactl.store.traits import load_trait
from personactl.store.workspace import Workspace

# ---------------------------------------------------------------- pure parts


def test_spec_is_read_from_the_right_and_written_back():
    spec = parse_condition("optimistic:user@prompt_end/pca:3:-0.5")
    assert spec == ConditionSpec("optimistic:user", 3, -0.5, "prompt_end", "pca")
    assert parse_condition(spec.spec()) == spec
    assert parse_condition("evil:12:2") == ConditionSpec("evil", 12, 2.0)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("evil:12", "bad --when"),
        ("evil:x:1", "bad layer 'x'"),
        ("evil:1.5:1", "bad layer '1.5'"),
        ("evil:0:1", "reads layer 0"),
        ("evil:3:abc", "bad threshold 'abc'"),
        ("evil:3:nan", "is not finite"),
        ("evil@Bad:3:1", "bad position"),
        ("evil@prompt_end/mean:3:1", "unknown aggregator"),
        (":3:1", "no vector"),
    ],
)
def test_bad_specs_are_one_input_error(spec, needle):
    with pytest.raises(InputError, match=needle.replace("(", r"\(")):
        parse_condition(spec)


def test_perfect_separation_gives_f1_one_between_the_classes():
    fit = best_threshold([0.9, 0.1, 0.5, 0.2, 1.4], [1, 0, 1, 0, 1])
    assert fit.f1 == 1.0 and (fit.tp, fit.fp, fit.fn, fit.tn) == (3, 0, 0, 2)
    assert 0.2 < fit.threshold < 0.5 and (fit.below, fit.above) == (0.2, 0.5)
    assert fit.threshold == 0.3  # the shortest decimal in the middle half of the gap (midpoint 0.35)


def test_ties_go_to_the_wider_gap_then_the_smaller_threshold():
    labels = [0, 1, 0, 0, 1]  # in projection order: splitting after the 1st or the 4th both give F1 2/3
    assert best_threshold([0, 1, 2, 3, 4], labels).threshold == 0.5  # equal gaps: the smaller threshold
    wide_last = best_threshold([0, 1, 2, 3, 7], labels)
    assert wide_last.threshold == 5 and wide_last.f1 == pytest.approx(2 / 3)  # the wider gap (4 > 1)
    assert best_threshold([0, 2, 3, 4, 5], labels).threshold == 1  # the wider gap (2 > 1), first


def test_scan_equals_brute_force_f1():
    projections = [0.3, -1.2, 0.7, 0.7, 2.5, -0.1, 1.1, 0.0]
    labels = [1, 0, 0, 1, 1, 0, 1, 0]
    fit = best_threshold(projections, labels)
    cuts = sorted(set(projections))
    brute = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        t = (lo + hi) / 2
        tp = sum(p > t and y for p, y in zip(projections, labels, strict=True))
        fp = sum(p > t and not y for p, y in zip(projections, labels, strict=True))
        brute.append(f1_of(tp, fp, sum(labels) - tp))
    assert fit.f1 == float(max(brute))
    passed = [p > fit.threshold for p in projections]
    assert fit.tp == sum(p and y for p, y in zip(passed, labels, strict=True))
    assert baseline_f1(labels) == pytest.approx(2 * 4 / (2 * 4 + 4))


def test_no_split_and_one_class():
    assert best_threshold([1.0, 1.0, 1.0], [0, 1, 1]) is None
    with pytest.raises(InputError, match="only one class"):
        best_threshold([0.0, 1.0], [1, 1])
    with pytest.raises(InputError, match="0 or 1"):
        best_threshold([0.0, 1.0], [0, 2])


def test_threshold_text_stays_inside_the_gap():
    assert threshold_text(0.2, 0.5) == "0.3"
    assert threshold_text(-3.0, 12.0) == "4"  # 4.5 is the midpoint; 4 is in the middle half
    assert threshold_text(3.0, 6.0) == "4"
    assert threshold_text(0.0, 1.0) == "0.5"  # 0 and 1 lie outside the middle half
    lo, hi = 1.0, 1.0 + 3e-9
    assert lo < float(threshold_text(lo, hi)) < hi


# ---------------------------------------------------------------- on a real tiny model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_factory):
    return isolated_extraction(tmp_path_factory.mktemp("condition"), str(tiny_factory("llama")))


PROMPTS = ("hello world", "why is the sky blue?")


def steer_rows(model, ws, *args):
    common = ["--model", model, "-w", ws, "--dtype", "float32", "--max-new-tokens", "6", "--json"]
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    result = invoke("steer", *prompts, *args, *common)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_a_gated_out_prompt_is_unsteered_and_a_passing_one_steered(isolated_env, setup):
    """Below the threshold a prompt's rows (swept α·v and plan alike) are its unsteered answer; above
    it they are exactly what the same steering gives without a condition (float32, greedy)."""
    model, ws, _ = setup
    steering = ["--vector", "optimistic", "--layers", "2", "--coefficients=-8,8", "--steer", "optimistic:1:8"]
    free = steer_rows(model, ws, *steering)
    assert all(r["condition_passed"] is None and r["condition_projection"] is None for r in free)
    everyone = steer_rows(model, ws, *steering, "--when", "optimistic:2:-1e9")
    assert [r["text"] for r in everyone] == [r["text"] for r in free]
    projections = {r["prompt_index"]: r["condition_projection"] for r in everyone}
    assert projections[0] != projections[1]
    low, high = sorted(projections, key=projections.get)
    threshold = (projections[low] + projections[high]) / 2
    gated = steer_rows(model, ws, *steering, "--when", f"optimistic:2:{threshold!r}")
    assert [(r["prompt_index"], r["layer"], r["coefficient"]) for r in gated] == [
        (r["prompt_index"], r["layer"], r["coefficient"]) for r in free
    ]
    baseline = {r["prompt_index"]: r for r in free if r["baseline"]}
    for row, ungated in zip(gated, free, strict=True):
        assert row["condition_passed"] == (row["prompt_index"] == high)
        assert row["condition_projection"] == projections[row["prompt_index"]]
        if row["prompt_index"] == high or row["baseline"]:
            assert (row["text"], row["n_tokens"]) == (ungated["text"], ungated["n_tokens"])
        else:
            expected = baseline[low]
            assert (row["text"], row["n_tokens"]) == (expected["text"], expected["n_tokens"])
    steered_high = [r["text"] for r in free if r["prompt_index"] == high and not r["baseline"]]
    assert any(text != baseline[high]["text"] for text in steered_high)  # steering does change this prompt
    steered_low = [r["text"] for r in free if r["prompt_index"] == low and not r["baseline"]]
    assert any(text != baseline[low]["text"] for text in steered_low)  # so the gate is what kept it unsteered


def test_the_manifest_records_the_condition(isolated_env, setup):
    model, ws, _ = setup
    steer_rows(model, ws, "--steer", "optimistic:1:8", "--when", "optimistic@response_avg:2:1e9")
    manifests = sorted(ws.glob("*/optimistic/steer-*.manifest.json"), key=lambda p: p.stat().st_mtime)
    condition = json.loads(manifests[-1].read_text())["run"]["condition"]
    assert condition["spec"] == "optimistic@response_avg:2:1000000000.0"
    assert condition["layer"] == 2 and condition["threshold"] == 1e9 and condition["passed"] == 0
    assert len(condition["projections"]) == len(PROMPTS)


def test_the_gate_reads_the_same_projection_as_the_fit(isolated_env, setup):
    model, ws, _ = setup
    lm = load_model(model, dtype="float32", device="cpu", log=lambda m: None)
    condition = resolve_condition(
        "optimistic:2:0", workspace=Workspace(ws), lm=lm, position="response_avg", aggregator="mean_diff"
    )
    ids = [encode_prompt(lm.tokenizer, chat_messages(None, p)) for p in PROMPTS]
    together = prompt_projections(lm, ids, {2: condition.unit, 1: condition.unit})
    alone = [prompt_projections(lm, [one], {2: condition.unit})[2][0] for one in ids]
    assert together[2] == pytest.approx(alone, rel=1e-5, abs=1e-5)
    rows = steer_rows(model, ws, "--steer", "optimistic:1:8", "--when", "optimistic:2:0")
    by_prompt = {r["prompt_index"]: r["condition_projection"] for r in rows}
    assert [by_prompt[i] for i in range(len(PROMPTS))] == pytest.approx(together[2], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("optimistic:x:1", "bad layer 'x'"),
        ("optimistic:2:abc", "bad threshold 'abc'"),
        ("optimistic:0:1", "reads layer 0"),
        ("optimistic:9:1", "out of range"),
        ("nosuchtrait:2:1", "no vectors for 'nosuchtrait'"),
    ],
)
def test_bad_conditions_exit_2_with_one_line(isolated_env, setup, spec, needle):
    model, ws, _ = setup
    args = ["--prompt", "hi", "--steer", "optimistic:1:1", "--when", spec, "--model", model, "-w", ws]
    expect_error(invoke("steer", *args), needle)


def test_a_condition_vector_for_another_model_is_refused(isolated_env, setup, tmp_path):
    import torch

    from personactl.store.vectors import PersonaVector

    model, ws, vector_path = setup
    wide = PersonaVector.load(vector_path)
    wide.tensors = {k: torch.zeros(v.shape[0], 48) if v.dim() == 2 else v for k, v in wide.tensors.items()}
    wide.metadata = {**wide.metadata, "hidden_size": 48, "model": "some/other-model"}
    wide.save(tmp_path / "wide.safetensors")
    args = ["--prompt", "hi", "--steer", "optimistic:1:1", "--model", model, "-w", ws]
    expect_error(invoke("steer", *args, "--when", f"{tmp_path / 'wide.safetensors'}:2:0"), "does not fit")


def test_vllm_refuses_when_before_starting(isolated_env, setup, monkeypatch):
    import personactl.backends as backends

    model, ws, _ = setup
    started = []
    monkeypatch.setattr(backends, "open_model", lambda *a, **k: started.append(1))
    args = ["--prompt", "hi", "--steer", "optimistic:1:1", "--when", "optimistic:2:0", "--model", model, "-w", ws]
    expect_error(invoke("steer", *args, "--backend", "vllm"), "--when reads each prompt's activations")
    assert not started


def test_fit_on_a_trait_reports_f1_per_layer_and_a_usable_when(isolated_env, setup):
    model, ws, _ = setup
    common = ["--model", model, "-w", ws, "--dtype", "float32"]
    result = invoke("condition", "fit", "--vector", "optimistic", "--trait", "optimistic", "--json", *common)
    assert result.exit_code == 0, result.output
    fit = json.loads(result.stdout)
    assert [row["layer"] for row in fit["layers"]] == [1, 2, 3]
    assert all(0.0 <= row["f1"] <= 1.0 for row in fit["layers"])
    assert fit["best"]["f1"] == max(row["f1"] for row in fit["layers"]) >= fit["baseline_f1"]
    assert fit["source"]["questions"] == "evaluation"
    trait = load_trait("optimistic")
    prompts, _ = trait_prompts(trait)
    assert fit["prompts"] == len(prompts) == 2 * len(trait.instructions) * len(trait.questions.evaluation)
    spec = parse_condition(fit["when"])
    assert (spec.layer, spec.threshold) == (fit["best"]["layer"], fit["best"]["threshold"])
    assert json.loads(open(fit["artifact"]).read())["when"] == fit["when"]  # the saved artifact

    # the fit's F1 is what the gate's own reading gives at that threshold
    lm = load_model(model, dtype="float32", device="cpu", log=lambda m: None)
    condition = resolve_condition(spec, workspace=Workspace(ws), lm=lm, position="response_avg", aggregator="mean_diff")
    ids = [encode_prompt(lm.tokenizer, chat_messages(p.system, p.text)) for p in prompts]
    passed = [p > spec.threshold for p in prompt_projections(lm, ids, {spec.layer: condition.unit})[spec.layer]]
    tp = sum(ok and p.label for ok, p in zip(passed, prompts, strict=True))
    assert float(f1_of(tp, sum(passed) - tp, sum(p.label for p in prompts) - tp)) == fit["best"]["f1"]

    rows = steer_rows(model, ws, "--steer", "optimistic:1:8", "--when", fit["when"])
    assert all(r["condition_passed"] is not None for r in rows)
    table = invoke("condition", "fit", "--vector", "optimistic", "--trait", "optimistic", "--layers", "2", *common)
    assert table.exit_code == 0, table.output
    assert "F1" in table.stdout and "--when optimistic@response_avg/mean_diff:2:" in table.stdout


def test_fit_on_a_labels_file(isolated_env, setup, tmp_path):
    model, ws, _ = setup
    labels = tmp_path / "labels.jsonl"
    lines = [("I love this!", 1), ("Great news today", 1), ("This is awful", 0), ("I hate waiting", 0)]
    labels.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in lines) + "\n\n")
    common = ["--vector", "optimistic", "--model", model, "-w", ws, "--dtype", "float32"]
    result = invoke("condition", "fit", "--labels", labels, "--system", "Be brief.", "--json", *common)
    assert result.exit_code == 0, result.output
    fit = json.loads(result.stdout)
    assert fit["prompts"] == 4 and fit["positives"] == 2 and fit["source"]["system"] == "Be brief."
    assert fit["when"].startswith("optimistic@response_avg/mean_diff:")


def test_fit_bad_inputs_exit_2(isolated_env, setup, tmp_path):
    model, ws, _ = setup
    common = ["--vector", "optimistic", "--model", model, "-w", ws]
    expect_error(invoke("condition", "fit", *common), "give labelled prompts")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": "yes"}\n')
    expect_error(invoke("condition", "fit", "--labels", bad, *common), "bad.jsonl:2: label 'yes' is not 0 or 1")
    bad.write_text('{"text": "a", "label": 1}\nnot json\n')
    expect_error(invoke("condition", "fit", "--labels", bad, *common), "bad.jsonl:2: not JSON")
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "a", "label": 1}\n')
    expect_error(invoke("condition", "fit", "--labels", one, *common), "only one class")
    expect_error(
        invoke("condition", "fit", "--trait", "optimistic", "--system", "x", *common), "--system goes with --labels"
    )
