"""`eval --proxy` with several traits: the cross-effect table without a judge.

Rows and answers are the judged table's (`steps.cross_effects`: the same prompts, seeds and
baselines, so the answers are the ones a judge would score). Column T scores an answer by reading
it back in this process as extraction reads its pairs (`read_examples`, at T's vector's position,
e.g. response_avg) at T's column layer and projecting that on T's unit direction there. The cell
is the mean paired change of that projection (steered minus unsteered, same prompts) with a 95%
t-interval, in units of T's own pos−neg separation at that layer: the mean difference of T's pos
and neg activations along T's direction (its norm, for a mean_diff vector). So 1.0 means the row
moved T's answers as far along T's direction as T's neg answers lie from its pos answers.

T's column layer: `--layers` with one layer, else the layer of largest Cohen's d in T's `eval
--proxy` sweep over `--layers` (all extracted layers by default; the sweep runs, or its saved
result is reused). Identical answers (an unchanged reply, α = 0) are read once, so their change
is exactly 0. Answers left empty have no response reading and count as missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import polars as pl

from personactl.backends import Sampling, require_activations
from personactl.core.directions import project, unit
from personactl.core.eval_summary import PAIR_KEYS
from personactl.core.stats import mean_ci
from personactl.errors import InputError
from personactl.model.loading import resolve_model
from personactl.steps.cross_effects import (
    CrossRow,
    answer_record,
    check_rows,
    cross_fingerprint,
    cross_matrix,
    generate_column,
    row_settings,
    row_steering,
)
from personactl.steps.evaluate import EvalSpec, Variant, file_sha256
from personactl.steps.skeleton import StepArtifact
from personactl.store.responses import fingerprint_of
from personactl.store.vectors import load_for_model

if TYPE_CHECKING:
    from personactl.model.loading import LoadedModel
    from personactl.settings import Settings
    from personactl.store.traits import Trait
    from personactl.store.workspace import Workspace

UNIT = (
    "the column trait's pos−neg separation at its column layer (the mean difference of its pos and neg "
    "activations along its direction): 1.0 = moved as far as from its neg answers to its pos answers"
)
LABEL = "proxy (no judge): change of each answer's projection on the column trait's vector, steered − unsteered"
NEEDS_ACTIVATIONS = "judge-free cross effects read activations in this process, so they need --backend hf or mlx"

PROXY_CROSS_SCHEMA = {
    "column": pl.String,  # the trait whose questions and vector these answers are read with
    "row": pl.String,  # what steered them (a `--cross` spec), null for the unsteered answers
    "condition": pl.String,  # unsteered | steered
    "layer": pl.Int32,  # a plain row's steering layer (null for a steering-plan row)
    "coefficient": pl.Float64,  # a plain row's α; a plan row's VALUE
    "question_index": pl.Int32,
    "sample_index": pl.Int32,
    "question": pl.String,
    "text": pl.String,
    "n_tokens": pl.Int32,
    "finish_reason": pl.String,
    "token_ids": pl.List(pl.Int64),  # the generated tokens that were read back (end of turn excluded)
    "read_layer": pl.Int32,  # the column layer the answer was read at
    "projection": pl.Float64,  # on the column's unit direction, residual-stream units (null: empty answer)
    "proxy_score": pl.Float64,  # projection / the column's separation (the table's unit)
}


@dataclass(frozen=True)
class Column:
    """Where column `trait` reads its answers, and why there."""

    trait: str
    layer: int
    position: str
    aggregator: str
    chosen_by: str  # "--layers" or "proxy sweep"
    cohens_d: float | None = None  # the proxy sweep's d at `layer`, when a sweep chose it


def column_from_sweep(trait: str, summary: dict[str, Any], variant: Variant) -> Column:
    """A column at the layer of largest Cohen's d of `trait`'s proxy sweep (its step's summary)."""
    best = summary.get("best")
    if summary.get("best_layer") is None or best is None:
        raise InputError(
            f"the proxy sweep of {trait} separated pos from neg answers at no layer (no answers to read)",
            hint="pass the column layer yourself with --layers LAYER, or more --questions / --max-new-tokens",
        )
    return Column(
        trait, int(summary["best_layer"]), variant.position, variant.aggregator, "proxy sweep", best["cohens_d"]
    )


def default_rows(columns: Sequence[Column], coefficients: Sequence[float], norm: str) -> list[CrossRow]:
    """Without --cross: each trait's own vector added at its column layer, once per α of --coefficients."""
    return [
        CrossRow(c.trait, c.layer, float(alpha), Variant(c.position, c.aggregator, norm))
        for c in columns
        for alpha in coefficients
    ]


def cross_proxy_step(
    *,
    settings: Settings,
    workspace: Workspace,
    traits: Sequence[Trait],
    columns: Sequence[Column],
    rows: Sequence[CrossRow],
    spec: EvalSpec,
    load: Callable[[], LoadedModel],
    sampling: Sampling | None = None,
    force: bool = False,
    on_phase: Callable[[str, int | None], None] = lambda what, total: None,
    on_chunk: Callable[[int, int], None] | None = None,
    on_judged: Callable[[Any], None] = lambda j: None,
    on_judge: Callable[[Any], None] = lambda judge: None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Skip when the same table exists; else generate every (row, column), read and project the
    answers, summarise (`on_judged`, `on_judge`: unused, there is no judge)."""
    require_activations(settings.backend, NEEDS_ACTIVATIONS, hint="use --backend hf or mlx, or drop --proxy and judge")
    check_rows(rows)
    sampling = sampling or Sampling(settings.max_new_tokens, settings.temperature, settings.top_p)
    fingerprint = proxy_fingerprint(settings, workspace, traits, columns, rows, spec, sampling)
    slug = resolve_model(settings.model).slug
    out = StepArtifact(
        workspace,
        workspace.eval_path(slug, traits[0].name, "cross-proxy-" + fingerprint_of(fingerprint)),
        "eval-cross-proxy",
        fingerprint,
        {"traits": [t.name for t in traits], "rows": [r.label for r in rows], "model": settings.model, "label": LABEL},
    )
    if out.current(force):
        manifest = out.manifest()
        return pl.read_parquet(out.path), out.skipped(**{**manifest["summary"], "files": manifest["files"]})
    lm = load()
    steering = row_steering(settings, workspace, lm, rows)
    readers = [ColumnReader.load(workspace, lm, c) for c in columns]  # before generating: a bad vector fails fast
    records: list[dict[str, Any]] = []
    for trait, reader in zip(traits, readers, strict=True):
        plan, generated = generate_column(settings, lm, trait, steering, spec, sampling, on_phase, on_chunk)
        answers = [answer_record(trait.name, cross, plan, row, gen) for cross, (_, row, gen) in generated]
        ids = [gen.token_ids for _, (_, _, gen) in generated]
        records += reader.score(
            lm, answers, ids, lambda total, t=trait.name: on_phase(f"eval cross --proxy: read {t}", total), on_chunk
        )
    samples = pl.DataFrame(records, schema=PROXY_CROSS_SCHEMA)
    summary = proxy_cross_summary(samples, [r.label for r in rows], [t.name for t in traits])
    summary["row_settings"] = row_settings(rows, steering)
    summary["column_settings"] = [
        {**asdict(c), "separation": r.separation} for c, r in zip(columns, readers, strict=True)
    ]
    files = {"samples": str(out.path)}
    out.commit(
        samples.write_parquet,
        settings=settings,
        model=lm.describe(),
        traits=[{"name": t.name, "sha256": t.sha256} for t in traits],
        counts={"responses": samples.height},
        summary=summary,
        files=files,
    )
    return samples, out.done(**summary, files=files)


def proxy_fingerprint(
    settings: Settings,
    workspace: Workspace,
    traits: Sequence[Trait],
    columns: Sequence[Column],
    rows: Sequence[CrossRow],
    spec: EvalSpec,
    sampling: Sampling,
) -> dict[str, Any]:
    """The judged table's inputs without its judge, plus where each column reads and its vector's hash."""
    slug = resolve_model(settings.model).slug
    base = cross_fingerprint(
        settings, workspace, traits, rows, spec, sampling, drop=("judge_model", "judge_base_url", "judge_mode")
    )
    read = [
        {
            "trait": c.trait,
            "layer": c.layer,
            "position": c.position,
            "aggregator": c.aggregator,
            "vector_sha256": file_sha256(workspace.find_vector(c.trait, slug)),
        }
        for c in columns
    ]
    return {**base, "kind": "eval-cross-proxy", "columns": read}


@dataclass(frozen=True)
class ColumnReader:
    """Column T's reading: T's unit direction at its column layer and T's pos−neg separation there."""

    column: Column
    direction: Any  # [H] unit, fp32
    separation: float

    @classmethod
    def load(cls, workspace: Workspace, lm: LoadedModel, column: Column) -> ColumnReader:
        vector = load_for_model(workspace, column.trait, lm).vector
        direction = unit(vector.at(column.layer, column.position, column.aggregator).float())
        difference = vector.at(column.layer, column.position, "mean_diff").float()
        separation = float((difference * direction).sum())
        if not separation > 0:  # NaN too
            raise InputError(
                f"the vector of {column.trait} does not separate its pos and neg answers at layer {column.layer} "
                f"({column.position}/{column.aggregator}: separation {separation:g})",
                hint="choose another column layer with --layers LAYER",
            )
        return cls(column, direction, separation)

    def score(
        self,
        lm: LoadedModel,
        answers: Sequence[dict[str, Any]],
        response_ids: Sequence[Sequence[int]],
        on_start: Callable[[int], None],
        on_chunk: Callable[[int, int], None] | None,
    ) -> list[dict[str, Any]]:
        """Each answer with its projection and proxy score; identical token sequences read once
        (`on_start(how many)` before reading, `on_chunk(n, 0)` as they are read)."""
        from personactl.model.chat_format import chat_messages, encode_example
        from personactl.model.example_activations import read_examples

        position, layer = self.column.position, self.column.layer
        examples = [
            encode_example(lm.tokenizer, chat_messages(None, a["question"]), response_ids=list(ids))
            for a, ids in zip(answers, response_ids, strict=True)
        ]
        readable = [e for e in examples if e.response_len > 0 or position.startswith("prompt")]
        unique = list(dict.fromkeys(e.input_ids for e in readable))
        by_ids: dict[tuple[int, ...], float] = {}
        on_start(len(unique))
        if unique:
            chosen = {e.input_ids: e for e in readable}
            readings = read_examples(
                lm.model,
                lm.layers,
                [chosen[ids] for ids in unique],
                pad_id=lm.tokenizer.pad_token_id,
                rows=[layer],
                positions=[position],
                on_batch=(lambda n: on_chunk(n, 0)) if on_chunk else None,
            )
            values = project(readings.values[:, 0, 0], self.direction).tolist()
            by_ids = dict(zip(unique, values, strict=True))
        out = []
        for answer, example in zip(answers, examples, strict=True):
            value = by_ids.get(example.input_ids)
            score = None if value is None else value / self.separation
            out.append(
                {
                    **answer,
                    "token_ids": list(example.input_ids[example.prompt_len :]),
                    "read_layer": layer,
                    "projection": value,
                    "proxy_score": score,
                }
            )
        return out


def proxy_cross_summary(samples: pl.DataFrame, rows: Sequence[str], columns: Sequence[str]) -> dict[str, Any]:
    """The matrix (rows = steering, columns = traits read): each cell the mean paired change of the
    column's proxy score against its unsteered answers, with a 95% t-interval, in separations."""

    def proxy(steered: pl.DataFrame, unsteered: pl.DataFrame) -> dict[str, Any]:
        return {
            "proxy": paired_proxy_change(steered, unsteered),
            "steered_mean": steered["proxy_score"].mean(),
            "unsteered_mean": unsteered["proxy_score"].mean(),
        }

    return {
        "rows": list(rows),
        "columns": list(columns),
        "matrix": cross_matrix(samples, rows, columns, proxy),
        "label": LABEL,
        "unit": UNIT,
        "definition": "cell = mean over the column trait's held-out (question, sample) pairs of the answer's "
        "projection on the column trait's unit vector at its column layer, steered by the row minus unsteered, "
        "divided by the column's separation; 95% t-interval of those paired differences",
    }


def paired_proxy_change(steered: pl.DataFrame, unsteered: pl.DataFrame) -> dict[str, Any]:
    """`eval_summary.paired_change` for proxy scores: the same pairing and t-interval, not clipped
    (a change of projections has no 0–100 scale to clip to)."""
    joined = steered.select(*PAIR_KEYS, "proxy_score").join(
        unsteered.select(*PAIR_KEYS, pl.col("proxy_score").alias("_ref")), on=PAIR_KEYS, how="inner"
    )
    diffs = [
        None if s is None or r is None else s - r
        for s, r in zip(joined["proxy_score"].to_list(), joined["_ref"].to_list(), strict=True)
    ]
    ci = mean_ci(diffs)
    return {"change": ci.mean, "low": ci.low, "high": ci.high, "n": ci.n, "missing": ci.missing}
