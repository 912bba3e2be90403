"""`eval` with several traits: a cross-effect table, what steering with each vector does to every
trait, so interference between traits is measured rather than assumed away.

Rows are vectors, each added at one layer with one α (`--cross VECTOR:LAYER:ALPHA`, or each trait's
own vector at its eval grid's best layer and recommended α). Columns are traits. For column T every
row steers the model on T's held-out evaluation questions, and T's judge rubric scores the answers;
the cell is the mean paired change of T's score against the unsteered answers to the same prompts
(`eval_summary.paired_change`, with a 95% t-interval), beside the change in coherence.

Each column's answers are generated as T's own `eval` generates them: the unsteered and prompted
baselines as one batched grid (only the unsteered answers are judged), and each row's steered
answers as one grid with the seed `eval` gives its first steered group. So the diagonal cell of a
trait at (layer, α) is the effect T's `eval` reports for that cell (steered minus unsteered mean).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import polars as pl

from personactl.backends import Sampling
from personactl.core.eval_summary import paired_change
from personactl.core.ranges import check_steering_layers
from personactl.core.steer_plan import parse_term, split_persona
from personactl.errors import InputError
from personactl.model.loading import resolve_model
from personactl.model.steering import GridRow
from personactl.steps.evaluate import (
    GROUP_SEED_STRIDE,
    EvalSpec,
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
    from personactl.model.loading import ModelHandle
    from personactl.settings import Settings
    from personactl.store.traits import Trait
    from personactl.store.workspace import Workspace


CROSS_SCHEMA = {
    "column": pl.String,  # the trait whose questions and rubric these answers are for
    "row": pl.String,  # what steered them (a `--cross` spec), null for the unsteered answers
    "condition": pl.String,  # unsteered | steered
    "layer": pl.Int32,
    "coefficient": pl.Float64,
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
    """One row of the table: a vector added at one layer with one α."""

    vector: str  # a vector file or a trait name
    layer: int
    alpha: float
    variant: Variant

    @property
    def label(self) -> str:
        v = self.variant
        return f"{self.vector}@{v.position}/{v.aggregator}:{self.layer}:{self.alpha:g}"


def parse_cross(spec: str, default: Variant) -> CrossRow:
    """`VECTOR[@position[/aggregator]]:LAYER:ALPHA` (the `--steer` grammar, one layer, `add` only)."""
    term = parse_term(spec)
    if term.op != "add" or len(term.layers) != 1 or term.value is None:
        raise InputError(
            f"--cross {spec}: a cross-effect row adds one vector at one layer",
            hint="write VECTOR:LAYER:ALPHA, e.g. --cross optimistic:12:4",
        )
    variant = Variant(term.position or default.position, term.aggregator or default.aggregator, default.norm)
    return CrossRow(term.vector, term.layers[0], float(term.value), variant)


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


def cross_fingerprint(
    settings: Settings,
    workspace: Workspace,
    traits: Sequence[Trait],
    rows: Sequence[CrossRow],
    spec: EvalSpec,
    sampling: Sampling,
) -> dict[str, Any]:
    """Everything the table depends on (the vector files found and hashed before any model loads)."""
    from personactl.steps.evaluate import eval_fingerprint

    slug = resolve_model(settings.model).slug
    base = eval_fingerprint(settings, traits[0], spec, None, sampling)
    return {
        **{
            k: v
            for k, v in base.items()
            if k not in ("vector_sha256", "trait_sha256", "spec", "kl_neutral_texts_sha256")
        },
        "kind": "eval-cross",
        "traits": [{"name": t.name, "sha256": t.sha256} for t in traits],
        "rows": [{**asdict(r), "vector_sha256": file_sha256(_vector_path(workspace, r.vector, slug))} for r in rows],
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
    if not rows:
        raise InputError("a cross-effect table needs rows", hint="pass --cross VECTOR:LAYER:ALPHA or two --trait")
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
    directions = _directions(workspace, lm, rows)
    records: list[dict[str, Any]] = []
    with judging(settings, workspace, load_judge) as judge:
        on_judge(judge)
        for trait in traits:
            records += _column(
                settings, lm, judge, trait, rows, directions, spec, sampling, on_phase, on_chunk, on_judged
            )
        identity = judge.identity
    samples = pl.DataFrame(records, schema=CROSS_SCHEMA)
    summary = cross_summary(samples, [r.label for r in rows], [t.name for t in traits])
    summary["row_settings"] = [{"label": r.label, **asdict(r)} for r in rows]
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


def _vector_path(workspace: Workspace, vector: str, slug: str) -> Any:
    name, persona = split_persona(vector)
    return workspace.find_vector(name, slug, persona)


def _directions(workspace: Workspace, lm: ModelHandle, rows: Sequence[CrossRow]) -> list[Any]:
    """Each row's direction at its layer (checked), scaled by its norm mode."""
    out = []
    for row in rows:
        check_steering_layers([row.layer], lm.num_layers)
        name, persona = split_persona(row.vector)  # `trait:user`: the user persona's file
        vector = load_for_model(workspace, name, lm, persona).vector
        v = row.variant
        out.append(vector.direction(row.layer, v.position, v.aggregator, v.norm))
    return out


def _column(
    settings: Settings,
    lm: ModelHandle,
    judge: Any,
    trait: Trait,
    rows: Sequence[CrossRow],
    directions: Sequence[Any],
    spec: EvalSpec,
    sampling: Sampling,
    on_phase: Callable[[str, int | None], None],
    on_chunk: Callable[[int, int], None] | None,
    on_judged: Callable[[Any], None],
) -> list[dict[str, Any]]:
    """One column: the unsteered answers to `trait`'s questions and every row's steered ones, judged
    on `trait`'s rubric; generated as `trait`'s own eval generates them (see the module doc)."""
    runner = grid_runner(settings, lm)
    plan = make_plan(trait, lm.tokenizer, spec.questions, spec.samples)
    common = {
        "sampling": sampling,
        "batch_size": settings.batch_size,
        "positions": spec.positions,
        "on_chunk": on_chunk,
    }
    on_phase(f"eval cross: generate for {trait.name}", plan.n_items * (2 + len(rows)))
    base = generate_rows(runner, plan, baseline_rows(plan), lambda tag, layer: None, seed=settings.seed, **common)
    generated = [(None, r) for r in base if r[0].condition == "unsteered"]
    for row, direction in zip(rows, directions, strict=True):
        tagged = [(Tag("steered", row.variant), GridRow(i, row.layer, row.alpha)) for i in range(plan.n_items)]
        steered = generate_rows(
            runner,
            plan,
            tagged,
            lambda tag, layer, d=direction: d,
            seed=settings.seed + GROUP_SEED_STRIDE,  # as an eval's first steered group (group 1)
            **common,
        )
        generated += [(row.label, r) for r in steered]
    on_phase(f"eval cross: judge for {trait.name}", 2 * len(generated))
    judged = judge_rows(judge, trait, plan, [r for _, r in generated], on_judged)
    return [
        _record(trait.name, label, plan, row, gen, trait_j, coherence_j)
        for (label, (_, row, gen)), (trait_j, coherence_j) in zip(generated, judged, strict=True)
    ]


def _record(column: str, label: str | None, plan: Any, row: GridRow, gen: Any, trait_j: Any, coherence_j: Any) -> dict:
    q, s = plan.item(row.prompt_index)
    return {
        "column": column,
        "row": label,
        "condition": "unsteered" if label is None else "steered",
        "layer": row.layer,
        "coefficient": row.coefficient,
        "question_index": q,
        "sample_index": s,
        "question": plan.questions[q],
        "text": gen.text,
        "n_tokens": len(gen.token_ids),
        "finish_reason": gen.finish_reason,
        "trait_score": trait_j.score,
        "trait_reason": trait_j.reason,
        "coherence_score": coherence_j.score,
        "coherence_reason": coherence_j.reason,
    }


def cross_summary(samples: pl.DataFrame, rows: Sequence[str], columns: Sequence[str]) -> dict[str, Any]:
    """The matrix (rows = steering vectors, columns = judged traits): each cell the paired change of
    the column's trait score (and coherence) against its unsteered answers, with 95% CIs."""
    matrix = []
    for label in rows:
        cells = []
        for column in columns:
            mine = samples.filter(pl.col("column") == column)
            unsteered = mine.filter(pl.col("condition") == "unsteered")
            steered = mine.filter(pl.col("row") == label)
            cells.append(
                {
                    "row": label,
                    "column": column,
                    "trait": paired_change(steered, unsteered, "trait_score"),
                    "coherence": paired_change(steered, unsteered, "coherence_score"),
                    "steered_trait_mean": steered["trait_score"].mean(),
                    "unsteered_trait_mean": unsteered["trait_score"].mean(),
                }
            )
        matrix.append(cells)
    return {
        "rows": list(rows),
        "columns": list(columns),
        "matrix": matrix,
        "definition": "cell = mean over the column trait's held-out (question, sample) pairs of the column's judge "
        "score steered by the row minus unsteered, both scored; 95% t-interval of those paired differences",
    }
