"""`personactl run`: the whole pipeline for one trait, each step skipping finished artifacts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from personactl.cli import options as o
from personactl.cli.common import (
    emit_json,
    guarded,
    log,
    open_workspace,
    settings_from,
    stdout_console,
    trait_lock,
)
from personactl.cli.eval import (
    build_spec,
    judge_loader,
    print_eval,
    print_proxy,
    shared_loader,
    with_progress,
)

if TYPE_CHECKING:
    from personactl.settings import Settings
    from personactl.steps.evaluate import EvalSpec
    from personactl.store.traits import Trait
    from personactl.store.workspace import Workspace

GenerateQuestions = Annotated[
    Optional[int],
    typer.Option(
        "--questions", min=1, help="generate: first N extraction questions (default: all).", show_default=False
    ),
]
EvalQuestions = Annotated[
    Optional[int],
    typer.Option(
        "--eval-questions", min=1, help="eval: first N held-out questions (default: all).", show_default=False
    ),
]
Adaptive = Annotated[bool, typer.Option("--adaptive", help="eval: search the largest coherent α per layer.")]
Proxy = Annotated[bool, typer.Option("--proxy", help="No judge: skip score, eval by the projection proxy.")]
DryRun = Annotated[
    bool,
    typer.Option("--dry-run", help="Only say, per step, how many generations and judgements it needs, and how long."),
]


@guarded
def run(
    trait: o.TraitName,
    questions: GenerateQuestions = None,
    eval_questions: EvalQuestions = None,
    samples: o.Samples = 1,
    layers: o.EvalLayers = None,
    coefficients: o.EvalCoefficients = "0.5,1,2,4",
    random_seeds: o.RandomSeeds = 2,
    adaptive: Adaptive = False,
    proxy: Proxy = False,
    plots: o.Plots = True,
    judge_model: o.JudgeModel = None,
    judge_base_url: o.JudgeBaseUrl = None,
    judge_mode: o.JudgeMode = None,
    coherence_threshold: o.CellCoherenceThreshold = None,
    max_new_tokens: o.MaxNewTokens = None,
    model: o.Model = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    dtype: o.Dtype = None,
    device: o.Device = None,
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    dry_run: DryRun = False,
    json: o.Json = False,
) -> None:
    """generate → score → extract → eval for one trait; finished steps are skipped."""
    from personactl.store.traits import load_trait

    settings = settings_from(
        config,
        workspace=workspace,
        model=model,
        max_new_tokens=max_new_tokens,
        dtype=dtype,
        device=device,
        device_map=device_map,
        max_memory=max_memory,
        judge_model=judge_model,
        judge_base_url=judge_base_url,
        judge_mode=judge_mode,
        coherence_threshold=coherence_threshold,
    )
    trait_obj = load_trait(trait)
    ws = open_workspace(settings)
    spec = build_spec(
        layers=layers,
        coefficients=coefficients,
        questions=eval_questions,
        samples=samples,
        random_seeds=random_seeds,
        adaptive=adaptive,
        plots=plots,
    )
    if dry_run:
        print_estimate(settings, ws, trait_obj, spec, questions, proxy, json)
        return
    result = run_all(settings, ws, trait_obj, spec, questions=questions, eval_questions=eval_questions, proxy=proxy)
    for name, summary in result["steps"].items():
        if summary.get("skipped"):
            log(f"{name}: skipped, {summary['artifact']} is already complete")
    if json:
        emit_json(result)
    else:
        print_result(result, trait_obj.name, proxy)


def print_estimate(
    settings: Settings, ws: Workspace, trait: Trait, spec: EvalSpec, questions: int | None, proxy: bool, json: bool
) -> None:
    """`run --dry-run`: per step, the generations and judgements it needs; no model is loaded."""
    from personactl.steps.run_estimate import describe_run_estimate, estimate_run

    estimate = estimate_run(
        settings=settings, workspace=ws, trait=trait, spec=spec, max_questions=questions, proxy=proxy
    )
    if json:
        emit_json(estimate)
    else:
        typer.echo(describe_run_estimate(estimate, settings.judge_model))


def run_all(
    settings: Settings,
    ws: Workspace,
    trait: Trait,
    spec: EvalSpec,
    *,
    questions: int | None,
    eval_questions: int | None,
    proxy: bool,
) -> dict[str, Any]:
    """The four steps under the trait's lock, loading the model once, when a step first needs it."""
    from personactl.steps.run import run_pipeline

    loaded: dict[str, Any] = {}
    with trait_lock(ws, settings, trait.name):
        return with_progress(
            run_pipeline,
            settings=settings,
            workspace=ws,
            trait=trait,
            spec=spec,
            load=shared_loader(settings, spec, loaded),
            load_judge=judge_loader(settings, loaded),
            max_questions=questions,
            eval_questions=eval_questions,
            proxy=proxy,
            on_step=lambda name: log(f"— {name}"),
        )


def print_result(result: dict[str, Any], trait_name: str, proxy: bool) -> None:
    """The eval's tables, then the recommendation as a command to run."""
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
            f"recommended: personactl steer --vector {trait_name} --layers {rec['layer']} "
            f"--coefficients={rec['alpha']:g}",
            markup=False,
            soft_wrap=True,
        )
