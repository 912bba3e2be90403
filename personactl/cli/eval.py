"""`personactl eval`: which layer and which α, with numbers (judged grid, baselines, plots)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from personactl.cli import options as o
from personactl.cli.common import (
    LazyProgress,
    check_choices,
    comma_list,
    emit_json,
    guarded,
    load_engine,
    load_model_from,
    log,
    open_workspace,
    settings_from,
    stdout_console,
)

if TYPE_CHECKING:
    from personactl.settings import Settings
    from personactl.steps.evaluate import EvalSpec
    from personactl.store.traits import Trait
    from personactl.store.workspace import Workspace

TraitVector = Annotated[
    Optional[str],
    typer.Option(
        "--vector",
        "-v",
        help="Vector file to evaluate (default: the trait's vectors; with --steer, none: the plan alone).",
        show_default=False,
    ),
]
PositionList = Annotated[
    str, typer.Option("--position", help="Vector position(s), comma list: each is a variant of the grid.")
]
NormList = Annotated[str, typer.Option("--norm", help="Norm mode(s), comma list of raw, unit, stream.")]
Questions = Annotated[
    Optional[int],
    typer.Option(
        "--questions", min=1, help="First N held-out evaluation questions (default: all).", show_default=False
    ),
]
Adaptive = Annotated[
    bool, typer.Option("--adaptive", help="Search per layer for the largest coherent α instead of a grid.")
]
Rounds = Annotated[int, typer.Option("--rounds", min=1, help="Adaptive: probes per layer.")]
AlphaStart = Annotated[float, typer.Option("--alpha-start", help="Adaptive: first α probed.")]
AlphaCap = Annotated[
    float, typer.Option("--alpha-cap", help="Adaptive: the largest α the search probes (doubling stops here).")
]
Proxy = Annotated[
    bool,
    typer.Option(
        "--proxy",
        help="No judge: Cohen's d of held-out pos vs neg projections per layer; with several --trait (or --cross) "
        "a cross-effect table of projection changes.",
    ),
]
MaxKL = Annotated[
    Optional[float],
    typer.Option(
        "--max-kl",
        help="KL budget: the recommended α keeps kl_neutral (nats/token on neutral texts) at or below it (default: 1).",
        show_default=False,
    ),
]
Temperature = Annotated[
    Optional[float],
    typer.Option("--temperature", min=0.0, help="0 = greedy (default: 1.0, the setting).", show_default=False),
]
Traits = Annotated[
    list[str],
    typer.Option(
        "--trait",
        "-t",
        help="Trait name (traits/NAME.yaml) or trait file; repeat it for a cross-effect table: each trait's "
        "vector steered at its grid's best, judged on every trait's rubric.",
    ),
]
Cross = Annotated[
    Optional[list[str]],
    typer.Option(
        "--cross",
        help="A cross-effect row, repeatable: a --steer term VECTOR[@position[/aggregator]]:LAYERS:VALUE[:OP] "
        "(e.g. evil:12:4, evil:10-14:2, evil:12:0:ablate), judged on every --trait (instead of each trait's "
        "grid's best).",
        show_default=False,
    ),
]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Only say how many generations and judgements it needs, and how long.")
]


class Phases:
    """One progress bar per phase (generate, judge, ...), each appearing when its work starts."""

    def __init__(self) -> None:
        self.current: LazyProgress | None = None

    def phase(self, description: str, total: int | None) -> None:
        self.close()
        self.current = LazyProgress(description)
        self.current.start(total)

    def advance(self, n: int, tokens: int = 0) -> None:
        if self.current is not None:
            self.current.advance(n, tokens)

    def judged(self, _judgement: Any) -> None:
        self.advance(1)

    def close(self) -> None:
        if self.current is not None:
            self.current.__exit__(None, None, None)
            self.current = None


def judge_loader(settings: Settings, loaded: dict[str, Any]):
    """Load a local judge model, reusing the evaluated model when it is the same spec and its engine
    gives full distributions (a Hugging Face model, not a vLLM engine)."""

    def load(spec: str):
        from personactl.backends import open_engine

        if spec == settings.model and "lm" in loaded and open_engine(settings, loaded["lm"]).full_distributions:
            return loaded["lm"]
        return load_model_from(settings.model_copy(update={"model": spec}))

    return load


def weak_judge_warning(judge: Any) -> None:
    if getattr(judge, "is_weak", False):
        log(f"warning: {judge.model} is a small local judge; its scores are rough (see docs/guides/judges.md)")


@guarded
def eval_cmd(
    trait: Traits,
    vector: TraitVector = None,
    plan: o.SteerPlan = None,
    layers: o.EvalLayers = None,
    coefficients: o.EvalCoefficients = "0.5,1,2,4",
    position: PositionList = "response_avg",
    aggregator: o.Aggregator = o.AggregatorChoice.mean_diff,
    norm: NormList = "raw",
    steer_positions: o.SteerPositions = o.SteerMode.all,
    old_positions: o.OldSteerPositions = None,
    questions: Questions = None,
    samples: o.Samples = 1,
    random_seeds: o.RandomSeeds = 2,
    adaptive: Adaptive = False,
    rounds: Rounds = 5,
    alpha_start: AlphaStart = 1.0,
    max_alpha: AlphaCap = 16.0,
    proxy: Proxy = False,
    cross: Cross = None,
    plots: o.Plots = True,
    judge_model: o.JudgeModel = None,
    judge_base_url: o.JudgeBaseUrl = None,
    judge_mode: o.JudgeMode = None,
    coherence_threshold: o.CellCoherenceThreshold = None,
    max_kl: MaxKL = None,
    max_new_tokens: o.MaxNewTokens = None,
    temperature: Temperature = None,
    seed: o.Seed = None,
    batch_size: o.BatchSize = None,
    model: o.Model = None,
    revision: o.Revision = None,
    workspace: o.Workspace = None,
    config: o.ConfigFile = None,
    dtype: o.Dtype = None,
    device: o.Device = None,
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    backend: o.Backend = None,
    force: o.Force = False,
    dry_run: DryRun = False,
    json: o.Json = False,
) -> None:
    """Which layer and α: judged steering on held-out questions vs unsteered, random-vector and prompting baselines.

    With --steer SPEC (repeatable) every steered and random row also follows that steering plan and a
    `plan` cell runs the plan alone; without --vector the plan alone is evaluated. With several --trait
    (or --cross), a cross-effect table: what steering with each vector does to every trait (with --proxy,
    judge-free: the change of each trait's projection, in units of its pos−neg separation)."""
    from personactl.store.traits import load_trait

    settings = settings_from(
        config, workspace=workspace, model=model, revision=revision, max_new_tokens=max_new_tokens,
        temperature=temperature, seed=seed, batch_size=batch_size, dtype=dtype, device=device, device_map=device_map,
        max_memory=max_memory, backend=backend, judge_model=judge_model, judge_base_url=judge_base_url,
        judge_mode=judge_mode, coherence_threshold=coherence_threshold,
    )  # fmt: skip
    check_kl_budget(max_kl)
    traits = [load_trait(t) for t in trait]
    ws = open_workspace(settings)
    spec = build_spec(
        layers=layers, coefficients=coefficients, position=position, aggregator=aggregator.value, norm=norm,
        positions=o.steer_positions(steer_positions, old_positions), questions=questions, samples=samples,
        random_seeds=random_seeds, adaptive=adaptive, rounds=rounds, alpha_start=alpha_start, max_alpha=max_alpha,
        plots=plots, plan=tuple(plan or ()), sweep=vector is not None or not plan,
    )  # fmt: skip
    crossing = len(traits) > 1 or bool(cross)
    check_modes(spec, proxy=proxy, crossing=crossing, vector=vector, dry_run=dry_run)
    if crossing:
        summary = cross_effects(settings, ws, traits, spec, cross or [], proxy=proxy, max_kl=max_kl, force=force)
        if json:
            return emit_json(summary)
        return print_cross_proxy(summary) if proxy else print_cross(summary)
    if dry_run and not proxy:
        return report_estimate(settings, ws, traits[0], spec, vector, json)
    summary = evaluate(settings, ws, traits[0], spec, vector_spec=vector, proxy=proxy, max_kl=max_kl, force=force)
    if json:
        emit_json(summary if proxy else with_cells(summary))
    else:
        print_proxy(summary) if proxy else print_eval(summary)


def check_modes(spec: EvalSpec, *, proxy: bool, crossing: bool, vector: str | None, dry_run: bool) -> None:
    """Refuse flag combinations no mode of eval runs, before anything loads."""
    from personactl.errors import InputError

    if proxy and spec.plan:
        raise InputError("--proxy measures a vector's projections, not a steering plan", hint="drop --proxy or --steer")
    if not crossing:
        return
    if spec.plan or vector is not None or dry_run or spec.adaptive:
        raise InputError(
            "a cross-effect table (several --trait, or --cross) steers with its rows alone",
            hint="drop --steer, --vector, --adaptive and --dry-run (a plan term can be a row: --cross SPEC)",
        )


def cross_effects(
    settings: Settings,
    ws: Workspace,
    traits: list[Trait],
    spec: EvalSpec,
    cross: list[str],
    *,
    proxy: bool,
    max_kl: float | None,
    force: bool,
) -> dict[str, Any]:
    """The cross-effect table: rows from --cross, else each trait's vector at its eval grid's best
    (the grid runs, or its saved result is reused); one model for all. With `proxy`, judge-free."""
    from personactl.steps.cross_effects import cross_effects_step, parse_cross, row_from_best

    variant = spec.variants[0]
    rows = [parse_cross(s, variant) for s in cross]  # a malformed row fails before any model loads
    if proxy:
        return proxy_cross_effects(settings, ws, traits, spec, rows, force=force)
    loaded: dict[str, Any] = {}
    if not rows:
        for t in traits:
            found = evaluate(
                settings, ws, t, spec, vector_spec=None, proxy=False, max_kl=max_kl, force=force, loaded=loaded
            )
            rows.append(row_from_best(t.name, found.get("best"), variant.norm))
    _, summary = with_progress(
        cross_effects_step,
        settings=settings,
        workspace=ws,
        traits=traits,
        rows=rows,
        spec=spec,
        load=shared_loader(settings, spec, loaded),
        load_judge=judge_loader(settings, loaded),
        force=force,
    )
    return said_if_skipped(summary)


def proxy_cross_effects(
    settings: Settings, ws: Workspace, traits: list[Trait], spec: EvalSpec, rows: list[Any], *, force: bool
) -> dict[str, Any]:
    """The judge-free table: each trait's column layer is --layers when it names one layer, else the
    best of the trait's proxy sweep over --layers (run, or its saved result reused); rows from
    --cross, else each trait's vector at its column layer with every α of --coefficients."""
    from personactl.backends import require_activations
    from personactl.steps.cross_proxy import (
        NEEDS_ACTIVATIONS,
        Column,
        column_from_sweep,
        cross_proxy_step,
        default_rows,
    )

    require_activations(settings.backend, NEEDS_ACTIVATIONS, hint="use --backend hf or mlx, or drop --proxy and judge")
    variant, loaded = spec.variants[0], {}
    columns = []
    for t in traits:
        if spec.layers is not None and len(spec.layers) == 1:
            columns.append(Column(t.name, spec.layers[0], variant.position, variant.aggregator, "--layers"))
            continue
        swept = evaluate(settings, ws, t, spec, vector_spec=None, proxy=True, max_kl=None, force=force, loaded=loaded)
        columns.append(column_from_sweep(t.name, swept, variant))
    _, summary = with_progress(
        cross_proxy_step,
        settings=settings,
        workspace=ws,
        traits=traits,
        columns=columns,
        rows=rows or default_rows(columns, spec.coefficients, variant.norm),
        spec=spec,
        load=shared_loader(settings, spec, loaded),
        force=force,
    )
    return said_if_skipped(summary)


def check_kl_budget(max_kl: float | None) -> None:
    if max_kl is not None:
        from personactl.core.eval_summary import check_max_kl

        check_max_kl(max_kl)


def evaluate(
    settings: Settings,
    ws: Workspace,
    trait: Trait,
    spec: EvalSpec,
    *,
    vector_spec: str | None,
    proxy: bool,
    max_kl: float | None,
    force: bool,
    loaded: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The judged eval of `spec`, or with `proxy` the judge-free sweep (`steps.eval_any`), showing a
    progress bar per phase; its summary. `loaded` shares one model between several evals."""
    from personactl.steps.eval_any import eval_or_proxy

    loaded = {} if loaded is None else loaded
    _, summary = with_progress(
        eval_or_proxy,
        settings=settings,
        workspace=ws,
        trait=trait,
        spec=spec,
        load=shared_loader(settings, spec, loaded),
        proxy=proxy,
        load_judge=judge_loader(settings, loaded),
        vector_spec=vector_spec,
        max_kl=max_kl,
        force=force,
    )
    return said_if_skipped(summary)


def with_progress(step: Callable[..., Any], **inputs: Any) -> Any:
    """Run a judged step with a progress bar per phase and the weak-judge warning; its result."""
    phases = Phases()
    try:
        return step(
            **inputs,
            on_phase=phases.phase,
            on_chunk=phases.advance,
            on_judged=phases.judged,
            on_judge=weak_judge_warning,
        )
    finally:
        phases.close()


def said_if_skipped(summary: dict[str, Any]) -> dict[str, Any]:
    if summary.get("skipped"):
        log(f"skipped: {summary['artifact']} is already complete; --force to rerun")
    return summary


def shared_loader(settings: Settings, spec: EvalSpec, loaded: dict[str, Any]):
    """Load the engine once, into `loaded["lm"]`, for every step of this command."""

    def load():
        if "lm" not in loaded or getattr(loaded["lm"], "closed", False):  # a vLLM engine closed for kl_neutral
            loaded["lm"] = load_engine(settings, steering=True, positions=spec.positions)
        return loaded["lm"]

    return load


def report_estimate(
    settings: Settings, ws: Workspace, trait_obj: Trait, spec: EvalSpec, vector_spec: str | None, json: bool
) -> None:
    """`eval --dry-run`: counts from the trait and the vector file's layer count, time from speed
    measured earlier in this workspace. No model is loaded."""
    from personactl.model.loading import resolve_model
    from personactl.steps.eval_estimate import describe_estimate, estimate_eval, measured_tokens_per_second
    from personactl.store.vectors import PersonaVector

    slug = resolve_model(settings.model).slug
    num_layers = PersonaVector.load(ws.find_vector(vector_spec or trait_obj.name, slug)).num_layers if spec.sweep else 0
    estimate = estimate_eval(
        trait=trait_obj,
        spec=spec,
        num_layers=num_layers,
        max_new_tokens=settings.max_new_tokens,
        tokens_per_second=measured_tokens_per_second(ws, slug),
    )
    if json:
        emit_json(estimate)
    else:
        typer.echo(describe_estimate(estimate, settings.judge_model))


def with_cells(summary: dict[str, Any]) -> dict[str, Any]:
    """The JSON document carries every cell (means, CIs, coherent, kl_neutral), not only its file."""
    import polars as pl

    return {**summary, "cells": pl.read_parquet(summary["files"]["cells"]).to_dicts()}


def build_spec(
    *,
    layers: str | None,
    coefficients: str,
    questions: int | None,
    samples: int,
    random_seeds: int,
    adaptive: bool,
    plots: bool,
    position: str = "response_avg",
    aggregator: str = "mean_diff",
    norm: str = "raw",
    positions: str = "all",
    rounds: int = 5,
    alpha_start: float = 1.0,
    max_alpha: float = 16.0,
    plan: tuple[str, ...] = (),
    sweep: bool = True,
) -> EvalSpec:
    """Parse and check the grid flags into an EvalSpec (`position` and `norm` are comma lists: one
    variant per pair)."""
    from personactl.core.choices import NORM_MODES, POSITIONS
    from personactl.core.ranges import parse_floats, parse_ranges
    from personactl.steps.evaluate import EvalSpec, Variant

    position_list, norm_list = comma_list(position), comma_list(norm)
    check_choices(
        *[(p, POSITIONS, "--position") for p in position_list], *[(n, NORM_MODES, "--norm") for n in norm_list]
    )
    return EvalSpec(
        coefficients=tuple(parse_floats(coefficients)),
        layers=tuple(parse_ranges(layers)) if layers else None,
        variants=tuple(Variant(p, aggregator, n) for p in position_list for n in norm_list),
        questions=questions,
        samples=samples,
        random_seeds=random_seeds,
        positions=positions,
        adaptive=adaptive,
        rounds=rounds,
        alpha_start=alpha_start,
        max_alpha=max_alpha,
        plots=plots,
        plan=plan,
        sweep=sweep,
    )


def _ci(mean: float | None, low: float | None, high: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.1f}" if low is None else f"{mean:.1f} [{low:.1f}, {high:.1f}]"


def _num(value: float | None, fmt: str = "{:g}") -> str:
    return "—" if value is None else fmt.format(value)


def print_eval(summary: dict[str, Any]) -> None:
    """A table of every cell, then the per-layer analysis and the recommendation in words."""
    import polars as pl
    from rich.markup import escape
    from rich.table import Table

    console = stdout_console()
    cells = pl.read_parquet(summary["files"]["cells"])
    table = Table(
        "condition",
        "vector",
        "layer",
        "α",
        "trait (95% CI)",
        "coherence (95% CI)",
        "KL",
        "n",
        "no score (trait/coh.)",
        title=escape(
            f"eval {summary['trait']} · coherence threshold {summary['coherence_threshold']:g}"
            + (f" · KL budget {summary['max_kl']:g}" if summary.get("max_kl") is not None else "")
        ),
    )
    for c in cells.iter_rows(named=True):
        variant = "" if c["position"] is None else f"{c['position']}/{c['aggregator']}/{c['norm_mode']}"
        table.add_row(
            c["condition"],
            escape(variant),
            _num(c["layer"]),
            f"{c['coefficient']:g}",
            _ci(c["trait_mean"], c["trait_low"], c["trait_high"]),
            _ci(c["coherence_mean"], c["coherence_low"], c["coherence_high"]),
            _num(c.get("kl_neutral"), "{:.3f}"),
            str(c["n"]),
            f"{c['trait_missing']}/{c['coherence_missing']}",
            style="dim" if c["condition"] in ("random", "unsteered") else None,
        )
    console.print(table)
    if summary["layers"]:
        console.print(layer_table(summary))
    for line in recommendation_lines(summary):
        console.print(line, markup=False, soft_wrap=True)


def layer_table(summary: dict[str, Any]) -> Any:
    """Slope, breaking and KL-limit α and the recommendation per (variant, layer)."""
    from rich.markup import escape
    from rich.table import Table

    layers = Table(
        "vector", "layer", "slope (trait/α)", "breaking α", "KL limit α", "recommended α", "KL there", "trait there",
        "random there",
    )  # fmt: skip
    for a in summary["layers"]:
        layers.add_row(
            escape(f"{a['position']}/{a['aggregator']}/{a['norm_mode']}"),
            str(a["layer"]),
            _num(a["slope"], "{:+.2f}"),
            _num(a["breaking_alpha"]),
            _num(a.get("kl_limit_alpha")),
            _num(a["recommended_alpha"]),
            _num(a.get("kl_at_recommended"), "{:.3f}"),
            _num(a["trait_at_recommended"], "{:.1f}"),
            _num(a["random_trait_at_recommended"], "{:.1f}"),
        )
    return layers


def recommendation_lines(summary: dict[str, Any]) -> list[str]:
    """The answer in words: best layer and α, the breaking point, and prompting vs steering."""
    from personactl.core.eval_summary import diagnose

    best = summary.get("best")
    lines = []
    diagnosis = summary.get("diagnosis") or diagnose(
        summary["baselines"]["unsteered"], best, summary["coherence_threshold"]
    )  # results saved before the diagnosis existed
    if diagnosis.get("kind"):
        lines.append(f"{diagnosis['message']}: {diagnosis['hint']}")
    if best is not None:
        vector = f"{best['position']}/{best['aggregator']}/{best['norm_mode']}"
        alpha = best["recommended_alpha"]
        lines.append(
            f"best layer {best['layer']} ({vector}): trait {best['slope']:+.2f} per unit α while coherent; "
            + (f"recommended α {alpha:g}" if alpha is not None else "no α > 0 stays coherent")
            + (
                f"; coherence breaks at α {best['breaking_alpha']:g}"
                if best["breaking_alpha"] is not None
                else "; coherence did not break within the αs tried"
            )
        )
        if best.get("kl_limit_alpha") is not None:
            lines.append(
                f"KL budget {summary['max_kl']:g} nats/token on neutral texts: exceeded from α {best['kl_limit_alpha']:g}"
                + (
                    f"; kl_neutral {best['kl_at_recommended']:.3f} at α {alpha:g}"
                    if best.get("kl_at_recommended") is not None
                    else ""
                )
            )
        if best["steered_minus_random"] is not None:
            lines.append(
                f"steered vs a random vector of the same norm there: {best['trait_at_recommended']:.1f} vs "
                f"{best['random_trait_at_recommended']:.1f} ({best['steered_minus_random']:+.1f})"
            )
    lines += plan_lines(summary)
    comparison = summary.get("prompting_vs_steering")
    if comparison:
        verdict = "prompting is ahead" if comparison["prompting_ahead"] else "steering is ahead"
        if comparison["cis_overlap"]:
            verdict += " (the 95% CIs overlap)"
        lines.append(
            f"prompting baseline (positive system prompt): trait {comparison['prompted_trait']:.1f} vs steered "
            f"{comparison['steered_trait']:.1f}: {verdict}"
        )
    lines.append(f"CI: {summary['ci_method']}")
    lines.append("saved " + ", ".join([summary["artifact"], summary["files"]["cells"], *summary["files"]["plots"]]))
    return lines


def _change(effect: dict[str, Any]) -> str:
    if effect["change"] is None:
        return "—"
    ci = "" if effect["low"] is None else f" [{effect['low']:+.1f}, {effect['high']:+.1f}]"
    return f"{effect['change']:+.1f}{ci}"


def plan_lines(summary: dict[str, Any]) -> list[str]:
    """What the steering plan was and what it alone did against the unsteered answers."""
    plan, effect = summary.get("plan"), summary.get("plan_effect")
    if not plan:
        return []
    lines = ["steering plan: " + " ".join(f"--steer {t['spec']}" for t in plan["terms"])]
    if effect:
        lines.append(
            f"the plan alone vs unsteered (paired, 95% CI): trait {_change(effect['trait'])}, "
            f"coherence {_change(effect['coherence'])} (n {effect['trait']['n']})"
        )
    return lines


def print_cross(summary: dict[str, Any]) -> None:
    """The cross-effect matrix for a person: trait change (95% CI), then coherence change."""
    from rich.markup import escape
    from rich.table import Table

    console = stdout_console()
    for what, title in (("trait", "change in the column trait's score"), ("coherence", "change in coherence")):
        table = Table("steered with ↓ · judged on →", *map(escape, summary["columns"]), title=f"cross effects: {title}")
        table.columns[0].overflow = "fold"  # a row's label is its spec: wrapped, never cut
        for label, cells in zip(summary["rows"], summary["matrix"], strict=True):
            table.add_row(escape(label), *(_change(c[what]) for c in cells))
        console.print(table)
    console.print(
        f"vs unsteered answers to the same prompts (paired, 95% CI) · saved {summary['artifact']}",
        markup=False,
        soft_wrap=True,
    )


def print_cross_proxy(summary: dict[str, Any]) -> None:
    """The judge-free matrix: change of each column trait's projection, in its separations (95% CI)."""
    from rich.markup import escape
    from rich.table import Table

    console = stdout_console()
    layers = {c["trait"]: c["layer"] for c in summary["column_settings"]}
    columns = [escape(f"{c} (layer {layers[c]})") for c in summary["columns"]]
    table = Table("steered with ↓ · read on →", *columns, title="cross effects (proxy, no judge): change in projection")
    table.columns[0].overflow = "fold"
    for label, cells in zip(summary["rows"], summary["matrix"], strict=True):
        table.add_row(escape(label), *(_separations(c["proxy"]) for c in cells))
    console.print(table)
    chosen = ", ".join(f"{c['trait']} at {c['layer']} ({c['chosen_by']})" for c in summary["column_settings"])
    console.print(
        f"unit: {summary['unit']} · vs unsteered answers to the same prompts (paired, 95% CI) · column layers: "
        f"{chosen} · saved {summary['artifact']}",
        markup=False,
        soft_wrap=True,
    )


def _separations(effect: dict[str, Any]) -> str:
    if effect["change"] is None:
        return "—"
    ci = "" if effect["low"] is None else f" [{effect['low']:+.2f}, {effect['high']:+.2f}]"
    return f"{effect['change']:+.2f}{ci}"


def print_proxy(summary: dict[str, Any]) -> None:
    from rich.table import Table

    console = stdout_console()
    table = Table("layer", "Cohen's d", "pos mean proj.", "neg mean proj.", "n pos/neg", title=summary["label"])
    for r in summary["layers"]:
        table.add_row(
            str(r["layer"]),
            _num(r["cohens_d"], "{:+.2f}"),
            _num(r["pos_mean"], "{:.3f}"),
            _num(r["neg_mean"], "{:.3f}"),
            f"{r['n_pos']}/{r['n_neg']}",
        )
    console.print(table)
    console.print(
        f"largest separation (proxy): layer {summary['best_layer']} · saved {summary['artifact']} "
        + " ".join(summary["files"]["plots"]),
        markup=False,
        soft_wrap=True,
    )
