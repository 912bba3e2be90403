"""`eval` with several traits: a cross-effect table, what steering with each vector does to every
trait, so interference between traits is measured rather than assumed away.

Rows steer: a vector added at one layer with one α (`--cross VECTOR:LAYER:ALPHA`, or each trait's own
vector at its eval grid's best layer and recommended α), or any one `--steer` term (a layer group,
an ablation, a cap), which runs as a one-term steering plan. Columns are traits. For column T every
row steers the model on T's held-out evaluation questions, and T's judge rubric scores the answers;
the cell is the mean paired change of T's score against the unsteered answers to the same prompts
(`eval_summary.paired_change`, with a 95% t-interval), beside the change in coherence. Without a
judge, `steps.cross_proxy` scores the same answers by their projection on T's vector instead.

Each column's answers are generated as T's own `eval` generates them: the unsteered and prompted
baselines as one batched grid (only the unsteered answers are judged), and each row's steered
answers as one grid with the seed `eval` gives its first steered group. So the diagonal cell of a
trait at (layer, α) is the effect T's `eval` reports for that cell (steered minus unsteered mean).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import polars as pl

from personactl.backends import Sampling
from personactl.core.eval_summary import paired_change
from personactl.core.ranges import check_steering_layers
from personactl.core.steer_plan import PlanTerm, parse_term, split_persona
from personactl.errors import InputError
from personactl.model.loading import resolve_model
from personactl.model.steering import GridRow
from personactl.steps.evaluate import (
    GROUP_SEED_STRIDE,
    EvalSpec,
    Plan,
    Tag,
    Variant,
    baseline_rows,
    file_sha256,
    generate_rows,
    grid_runner,
    judge_rows,
    judging,
    make_plan,
)
from personactl.steps.skeleton import StepArtifact
from personactl.store.responses import fingerprint_of
from personactl.store.vectors import load_for_model

if TYPE_CHECKING:
    import torch

    from personactl.model.loading import ModelHandle
    from personactl.settings import Settings
    from personactl.store.traits import Trait
    from personactl.store.workspace import Workspace


CROSS_SCHEMA = {
    "column": pl.String,  # the trait whose questions and rubric these answers are for
    "row": pl.String,  # what steered them (a `--cross` spec), null for the unsteered answers
    "condition": pl.String,  # unsteered | steered
    "layer": pl.Int32,  # a plain row's layer (null for a steering-plan row: its layers are in its label)
    "coefficient": pl.Float64,  # a plain row's α; a plan row's VALUE (α, c or τ; null for τ from data)
    "question_index": pl.Int32,
    "sample_index": pl.Int32,
    "question": pl.String,
    "text": pl.String,
    "n_tokens": pl.Int32,
    "finish_reason": pl.String,
    "trait_score": pl.Float64,
    "trait_reason": pl.String,
    "coherence_score": pl.Float64,
    "coherence_reason": pl.String,
}


@dataclass(frozen=True)
class CrossRow:
    """One row of the table: a vector added at one layer with one α, or (`term`) any one steering
    plan term (a layer group, an ablation, a cap), run as a one-term plan."""

    vector: str  # a vector file or a trait name
    layer: int | None  # None for a plan term
    alpha: float | None  # a plan term's VALUE (None: a cap's τ from data)
    variant: Variant
    term: PlanTerm | None = None  # with its position and aggregator filled in from `variant`

    @property
    def label(self) -> str:
        if self.term is not None:
            return self.term.spec()
        v = self.variant
        return f"{self.vector}@{v.position}/{v.aggregator}:{self.layer}:{self.alpha:g}"

    def identity(self) -> dict[str, Any]:
        """What the row's answers depend on (a plain row's keeps the key it had before plan rows)."""
        out = asdict(self)
        if self.term is None:
            out.pop("term")
        else:
            out["term"] = self.term.spec()
        return out


def parse_cross(spec: str, default: Variant) -> CrossRow:
    """A `--steer` term (`VECTOR[@position[/aggregator]]:LAYERS:VALUE[:OP]`): one `add` at one layer is
    a plain row, as `VECTOR:LAYER:ALPHA` always was; anything else a one-term steering plan."""
    term = parse_term(spec)
    variant = Variant(term.position or default.position, term.aggregator or default.aggregator, default.norm)
    if term.op == "add" and len(term.layers) == 1 and term.value is not None:
        return CrossRow(term.vector, term.layers[0], float(term.value), variant)
    term = replace(term, position=variant.position, aggregator=variant.aggregator)
    return CrossRow(term.vector, None, term.value, variant, term)


def row_from_best(trait: str, best: dict[str, Any] | None, norm: str) -> CrossRow:
    """A trait's vector at its eval grid's best layer and recommended α."""
    if best is None or best.get("recommended_alpha") is None:
        raise InputError(
            f"the eval grid of {trait} recommends no layer and α to steer with",
            hint=f"pass the row yourself, e.g. --cross {trait}:LAYER:ALPHA, or widen --layers/--coefficients",
        )
    return CrossRow(
        trait, best["layer"], float(best["recommended_alpha"]), Variant(best["position"], best["aggregator"], norm)
    )


def rows_fingerprint(workspace: Workspace, rows: Sequence[CrossRow], slug: str) -> list[dict[str, Any]]:
    """Each row's settings and its vector file's hash (found before any model loads)."""
    return [{**r.identity(), "vector_sha256": file_sha256(_vector_path(workspace, r.vector, slug))} for r in rows]


def cross_fingerprint(
    settings: Settings,
    workspace: Workspace,
    traits: Sequence[Trait],
    rows: Sequence[CrossRow],
    spec: EvalSpec,
    sampling: Sampling,
    drop: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Everything the table depends on (the vector files found and hashed before any model loads);
    `drop`: the keys of `eval_fingerprint` a table without a judge does not depend on."""
    from personactl.steps.evaluate import eval_fingerprint

    slug = resolve_model(settings.model).slug
    base = eval_fingerprint(settings, traits[0], spec, None, sampling)
    unused = ("vector_sha256", "trait_sha256", "spec", "kl_neutral_texts_sha256", *drop)
    return {
        **{k: v for k, v in base.items() if k not in unused},
        "kind": "eval-cross",
        "traits": [{"name": t.name, "sha256": t.sha256} for t in traits],
        "rows": rows_fingerprint(workspace, rows, slug),
        "questions": spec.questions,
        "samples": spec.samples,
        "positions": spec.positions,
    }


def cross_effects_step(
    *,
    settings: Settings,
    workspace: Workspace,
    traits: Sequence[Trait],
    rows: Sequence[CrossRow],
    spec: EvalSpec,
    load: Callable[[], ModelHandle],
    load_judge: Callable[[str], Any] | None = None,
    sampling: Sampling | None = None,
    force: bool = False,
    on_phase: Callable[[str, int | None], None] = lambda what, total: None,
    on_chunk: Callable[[int, int], None] | None = None,
    on_judged: Callable[[Any], None] = lambda j: None,
    on_judge: Callable[[Any], None] = lambda judge: None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Skip when the same table exists; else generate and judge every (row, column), summarise."""
    check_rows(rows)
    sampling = sampling or Sampling(settings.max_new_tokens, settings.temperature, settings.top_p)
    slug = resolve_model(settings.model).slug
    fingerprint = cross_fingerprint(settings, workspace, traits, rows, spec, sampling)
    out = StepArtifact(
        workspace,
        workspace.eval_path(slug, traits[0].name, "cross-" + fingerprint_of(fingerprint)),
        "eval-cross",
        fingerprint,
        {"traits": [t.name for t in traits], "rows": [r.label for r in rows], "model": settings.model},
    )
    if out.current(force):
        manifest = out.manifest()
        return pl.read_parquet(out.path), out.skipped(**{**manifest["summary"], "files": manifest["files"]})
    lm = load()
    steering = row_steering(settings, workspace, lm, rows)
    records: list[dict[str, Any]] = []
    with judging(settings, workspace, load_judge) as judge:
        on_judge(judge)
        for trait in traits:
            plan, generated = generate_column(settings, lm, trait, steering, spec, sampling, on_phase, on_chunk)
            on_phase(f"eval cross: judge for {trait.name}", 2 * len(generated))
            judged = judge_rows(judge, trait, plan, [r for _, r in generated], on_judged)
            records += [
                {**answer_record(trait.name, cross, plan, row, gen), **_scores(trait_j, coherence_j)}
                for (cross, (_, row, gen)), (trait_j, coherence_j) in zip(generated, judged, strict=True)
            ]
        identity = judge.identity
    samples = pl.DataFrame(records, schema=CROSS_SCHEMA)
    summary = cross_summary(samples, [r.label for r in rows], [t.name for t in traits])
    summary["row_settings"] = row_settings(rows, steering)
    files = {"samples": str(out.path)}
    out.commit(
        samples.write_parquet,
        settings=settings,
        model=lm.describe(),
        traits=[{"name": t.name, "sha256": t.sha256} for t in traits],
        judge={"model": settings.judge_model, "identity": identity},
        counts={"responses": samples.height},
        summary=summary,
        files=files,
    )
    return samples, out.done(**summary, files=files)


def check_rows(rows: Sequence[CrossRow]) -> None:
    if not rows:
        raise InputError("a cross-effect table needs rows", hint="pass --cross VECTOR:LAYER:ALPHA or two --trait")
    labels = [r.label for r in rows]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise InputError(f"--cross {twice[0]} is given twice", hint="each row of the table once")


def _vector_path(workspace: Workspace, vector: str, slug: str) -> Any:
    name, persona = split_persona(vector)
    return workspace.find_vector(name, slug, persona)


@dataclass(frozen=True)
class RowSteering:
    """A row ready to run: its label and either a direction at its layer (a plain row, scaled by
    its norm mode) or a resolved one-term plan (layer → terms, and what it applied)."""

    row: CrossRow
    direction: torch.Tensor | None = None
    plan: Mapping[int, Sequence[Any]] | None = None
    described: dict[str, Any] | None = None  # `ResolvedPlan.describe()` of a plan row

    @property
    def label(self) -> str:
        return self.row.label


def row_steering(
    settings: Settings, workspace: Workspace, lm: ModelHandle, rows: Sequence[CrossRow]
) -> list[RowSteering]:
    """Every row checked and made ready for the loaded model: a plain row's direction at its layer,
    a plan row resolved by the steering-plan code (refused when the engine lacks its operation)."""
    from personactl.backends import check_plan_ops, open_engine
    from personactl.steps.plan import resolve_plan

    out = []
    for row in rows:
        v = row.variant
        if row.term is not None:
            resolved = resolve_plan(
                [row.term], workspace=workspace, lm=lm, position=v.position, aggregator=v.aggregator, norm=v.norm
            )
            check_plan_ops(open_engine(settings, lm), resolved.ops)
            out.append(RowSteering(row, plan=resolved.by_layer(), described=resolved.describe()))
            continue
        check_steering_layers([row.layer], lm.num_layers)
        name, persona = split_persona(row.vector)  # `trait:user`: the user persona's file
        vector = load_for_model(workspace, name, lm, persona).vector
        out.append(RowSteering(row, direction=vector.direction(row.layer, v.position, v.aggregator, v.norm)))
    return out


def row_settings(rows: Sequence[CrossRow], steering: Sequence[RowSteering]) -> list[dict[str, Any]]:
    """Each row as given, and for a plan row what it applied (τ of a cap resolved, per layer)."""
    return [
        {"label": r.label, **asdict(r), **({"plan": s.described} if s.described else {})}
        for r, s in zip(rows, steering, strict=True)
    ]


def generate_column(
    settings: Settings,
    lm: ModelHandle,
    trait: Trait,
    steering: Sequence[RowSteering],
    spec: EvalSpec,
    sampling: Sampling,
    on_phase: Callable[[str, int | None], None],
    on_chunk: Callable[[int, int], None] | None,
) -> tuple[Plan, list[tuple[CrossRow | None, tuple[Tag, GridRow, Any]]]]:
    """One column's answers: the unsteered answers to `trait`'s questions and every row's steered
    ones, as (the row, None for unsteered; generated row); generated as `trait`'s own eval generates them
    (see the module doc). A plan row runs as eval runs a plan alone, with the seed of a plain row."""
    runner = grid_runner(settings, lm)
    plan = make_plan(trait, lm.tokenizer, spec.questions, spec.samples)
    common = {
        "sampling": sampling,
        "batch_size": settings.batch_size,
        "positions": spec.positions,
        "on_chunk": on_chunk,
    }
    on_phase(f"eval cross: generate for {trait.name}", plan.n_items * (2 + len(steering)))
    base = generate_rows(runner, plan, baseline_rows(plan), lambda tag, layer: None, seed=settings.seed, **common)
    generated: list[tuple[CrossRow | None, tuple[Tag, GridRow, Any]]] = [
        (None, r) for r in base if r[0].condition == "unsteered"
    ]
    for s in steering:
        row = s.row
        if s.plan is not None:
            tagged = [(Tag("steered", row.variant), GridRow(i, None, 0.0, planned=True)) for i in range(plan.n_items)]
        else:
            tagged = [(Tag("steered", row.variant), GridRow(i, row.layer, row.alpha)) for i in range(plan.n_items)]
        steered = generate_rows(
            runner,
            plan,
            tagged,
            lambda tag, layer, d=s.direction: d,
            seed=settings.seed + GROUP_SEED_STRIDE,  # as an eval's first steered group (group 1)
            steering_plan=s.plan,
            **common,
        )
        generated += [(row, r) for r in steered]
    return plan, generated


def answer_record(column: str, cross: CrossRow | None, plan: Plan, row: GridRow, gen: Any) -> dict[str, Any]:
    """What a table row says of one answer (`cross` None: unsteered), beside its scores."""
    q, s = plan.item(row.prompt_index)
    return {
        "column": column,
        "row": None if cross is None else cross.label,
        "condition": "unsteered" if cross is None else "steered",
        "layer": row.layer,
        "coefficient": row.coefficient if cross is None or cross.term is None else cross.alpha,
        "question_index": q,
        "sample_index": s,
        "question": plan.questions[q],
        "text": gen.text,
        "n_tokens": len(gen.token_ids),
        "finish_reason": gen.finish_reason,
    }


def _scores(trait_j: Any, coherence_j: Any) -> dict[str, Any]:
    return {
        "trait_score": trait_j.score,
        "trait_reason": trait_j.reason,
        "coherence_score": coherence_j.score,
        "coherence_reason": coherence_j.reason,
    }


def cross_matrix(
    samples: pl.DataFrame,
    rows: Sequence[str],
    columns: Sequence[str],
    cell: Callable[[pl.DataFrame, pl.DataFrame], dict[str, Any]],
) -> list[list[dict[str, Any]]]:
    """`matrix[i][j]`: row i's steered answers to column j's questions against the column's unsteered
    answers, measured by `cell(steered, unsteered)` (the judged and the judge-free tables alike)."""
    matrix = []
    for label in rows:
        cells = []
        for column in columns:
            mine = samples.filter(pl.col("column") == column)
            unsteered = mine.filter(pl.col("condition") == "unsteered")
            steered = mine.filter(pl.col("row") == label)
            cells.append({"row": label, "column": column, **cell(steered, unsteered)})
        matrix.append(cells)
    return matrix


def cross_summary(samples: pl.DataFrame, rows: Sequence[str], columns: Sequence[str]) -> dict[str, Any]:
    """The matrix (rows = steering vectors, columns = judged traits): each cell the paired change of
    the column's trait score (and coherence) against its unsteered answers, with 95% CIs."""

    def judged(steered: pl.DataFrame, unsteered: pl.DataFrame) -> dict[str, Any]:
        return {
            "trait": paired_change(steered, unsteered, "trait_score"),
            "coherence": paired_change(steered, unsteered, "coherence_score"),
            "steered_trait_mean": steered["trait_score"].mean(),
            "unsteered_trait_mean": unsteered["trait_score"].mean(),
        }

    return {
        "rows": list(rows),
        "columns": list(columns),
        "matrix": cross_matrix(samples, rows, columns, judged),
        "definition": "cell = mean over the column trait's held-out (question, sample) pairs of the column's judge "
        "score steered by the row minus unsteered, both scored; 95% t-interval of those paired differences",
    }
