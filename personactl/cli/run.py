"""`personactl run`: the whole pipeline for one trait, each step skipping finished artifacts."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from personactl.cli import options as o
from personactl.cli.common import (
    emit_json,
    guarded,
    load_engine,
    log,
    open_workspace,
    settings_from,
    stdout_console,
    trait_lock,
)
from personactl.cli.eval import (
    Coefficients,
    CoherenceThreshold,
    JudgeBaseUrl,
    JudgeMode,
    JudgeModel,
    Phases,
    RandomSeeds,
    Samples,
    build_spec,
    judge_loader,
    print_eval,
    print_proxy,
    weak_judge_warning,
)


@guarded
def run(
    trait: o.TraitName,
    questions: Annotated[
        Optional[int],
        typer.Option(
            "--questions", min=1, help="generate: first N extraction questions (default: all).", show_default=False
        ),
    ] = None,
    eval_questions: Annotated[
        Optional[int],
        typer.Option(
            "--eval-questions", min=1, help="eval: first N held-out questions (default: all).", show_default=False
        ),
    ] = None,
    samples: Samples = 1,
    layers: o.EvalLayers = None,
    coefficients: Coefficients = "0.5,1,2,4",
    random_seeds: RandomSeeds = 2,
    adaptive: Annotated[
        bool, typer.Option("--adaptive", help="eval: search the largest coherent α per layer.")
    ] = False,
    proxy: Annotated[bool, typer.Option("--proxy", help="No judge: skip score, eval by the projection proxy.")] = False,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots.")] = True,
    judge_model: JudgeModel = None,
    judge_base_url: JudgeBaseUrl = None,
    judge_mode: JudgeMode = None,
    coherence_threshold: CoherenceThreshold = None,
    max_new_tokens: o.MaxNewTokens = None,
    model: o.Model = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    dtype: o.Dtype = None,
    device: o.Device = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Only say, per step, how many generations and judgements it needs, and how long."
        ),
    ] = False,
    json: o.Json = False,
) -> None:
    """generate → score → extract → eval for one trait; finished steps are skipped."""
    from personactl.steps.run import run_pipeline
    from personactl.store.traits import load_trait

    settings = settings_from(
        config,
        workspace=workspace,
        model=model,
        max_new_tokens=max_new_tokens,
        dtype=dtype,
        device=device,
        judge_model=judge_model,
        judge_base_url=judge_base_url,
        judge_mode=judge_mode,
        coherence_threshold=coherence_threshold,
    )
    trait_obj = load_trait(trait)
    ws = open_workspace(settings)
    spec = build_spec(
        layers, coefficients, "response_avg", "mean_diff", "raw", "all", eval_questions, samples, random_seeds,
        adaptive, 5, 1.0, 16.0, plots,
    )  # fmt: skip
    if dry_run:
        from personactl.steps.run_estimate import describe_run_estimate, estimate_run

        estimate = estimate_run(
            settings=settings, workspace=ws, trait=trait_obj, spec=spec, max_questions=questions, proxy=proxy
        )
        if json:
            emit_json(estimate)
        else:
            typer.echo(describe_run_estimate(estimate, settings.judge_model))
        return
    loaded: dict[str, Any] = {}

    def load():
        if "lm" not in loaded:
            loaded["lm"] = load_engine(settings, steering=True, positions=spec.positions)
        return loaded["lm"]

    phases = Phases()
    with trait_lock(ws, settings, trait_obj.name):
        try:
            result = run_pipeline(
                settings=settings,
                workspace=ws,
                trait=trait_obj,
                spec=spec,
                load=load,
                load_judge=judge_loader(settings, loaded),
                max_questions=questions,
                eval_questions=eval_questions,
                proxy=proxy,
                on_step=lambda name: log(f"— {name}"),
                on_phase=phases.phase,
                on_chunk=phases.advance,
                on_judged=phases.judged,
                on_judge=weak_judge_warning,
            )
        finally:
            phases.close()
    for name, summary in result["steps"].items():
        if summary.get("skipped"):
            log(f"{name}: skipped, {summary['artifact']} is already complete")
    if json:
        emit_json(result)
        return
    (print_proxy if proxy else print_eval)(result["steps"]["eval"])
    rec = result["recommendation"]
    console = stdout_console()
    if rec["layer"] is None:
        console.print("no recommendation: see the tables above", markup=False)
    elif rec["kind"] == "proxy":
        console.print(f"proxy recommendation: layer {rec['layer']} (no α without a judge)", markup=False)
    elif rec["alpha"] is None:
        diagnosis = result["steps"]["eval"].get("diagnosis") or {}
        why = f"{diagnosis['message']}: {diagnosis['hint']}" if diagnosis.get("kind") else "try smaller αs"
        console.print(f"best layer {rec['layer']}, but no α > 0 stayed coherent: {why}", markup=False)
    else:
        console.print(
            f"recommended: personactl steer --vector {trait_obj.name} --layers {rec['layer']} "
            f"--coefficients={rec['alpha']:g}",
            markup=False,
            soft_wrap=True,
        )
