"""`personactl eval`: steer on the trait's held-out questions over layers × α, judge every response
for trait and coherence, and compare with baselines run in the same call on the same budget.

Conditions (each cell gets the same Q questions × n samples):
- `steered`: α·v at one layer (v = the trait vector, per vector variant: position/aggregator/norm);
- `random`: a Gaussian direction scaled to ‖v‖ at that layer and α; sample i uses random seed
  i mod K, so a random cell averages over K directions at the steered cell's budget;
- `unsteered`: α = 0 (the same at every layer, so generated once);
- `prompted`: no steering, the trait's positive system prompt (question q uses instruction pair
  q mod #pairs): the prompting baseline that AxBench found often beats steering.

Generation goes through `personactl.model.steering.run_grid` (or the vLLM engine's `run_grid`): one
batched call per chunk, each row with its own layer and α. Rows whose directions differ (the trait
vector, each random seed) run as separate grids, since a grid has one direction per layer.

`--adaptive` replaces the α grid by a search per layer for the largest α whose mean coherence
stays ≥ C: start at `alpha_start`, double while coherent (up to `max_alpha`), then bisect between
the last coherent and the first broken α, `rounds` probes in all. All layers probe together in
each round. It assumes coherence falls with α; the full grid shows when it does not.

Every steered and random row also gets `kl_neutral` (see `personactl.model.capability_cost`): the KL of
its direction at its (layer, α) on the shipped neutral texts, computed after generation with one
batched forward per few cells; unsteered rows get 0, prompted rows none. On the vLLM backend the
engine does not hand out full next-token distributions (only the top logprobs), so the KL is
computed by the same checkpoint loaded in Hugging Face transformers at the engine's dtype, after
the engine is closed (its accelerator memory is needed for that copy).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import torch

from personactl.backends import Sampling
from personactl.core.eval_summary import DEFAULT_MAX_KL, check_max_kl, summarize
from personactl.core.ranges import check_steering_layers
from personactl.errors import InputError
from personactl.judging.remote import JudgeCache
from personactl.model.capability_cost import NeutralKL
from personactl.model.loading import resolve_model
from personactl.model.steering import GridRow, plan_grid
from personactl.steps.plan import ResolvedPlan
from personactl.steps.score import effective_thresholds, make_judge
from personactl.steps.skeleton import StepArtifact
from personactl.store.atomic import atomic_path
from personactl.store.responses import fingerprint_of
from personactl.store.vectors import load_for_model

if TYPE_CHECKING:
    from personactl.judging.local import LocalJudge
    from personactl.judging.remote import RemoteJudge
    from personactl.model.loading import ModelHandle
    from personactl.settings import Settings
    from personactl.store.traits import Trait
    from personactl.store.workspace import Workspace

SAMPLES_SCHEMA = {
    "condition": pl.String,  # steered | random | unsteered | prompted | plan
    "position": pl.String,  # vector variant (null for unsteered/prompted)
    "aggregator": pl.String,
    "norm_mode": pl.String,
    "layer": pl.Int32,
    "coefficient": pl.Float64,
    "random_seed": pl.Int32,  # which random direction (random rows only)
    "round": pl.Int32,  # adaptive round (0 in a grid)
    "question_index": pl.Int32,
    "sample_index": pl.Int32,
    "question": pl.String,
    "system_prompt": pl.String,
    "vector_norm": pl.Float64,  # ‖v‖ at this layer after the norm mode (random: the same)
    "text": pl.String,
    "n_tokens": pl.Int32,
    "finish_reason": pl.String,
    "trait_score": pl.Float64,
    "trait_reason": pl.String,
    "coherence_score": pl.Float64,
    "coherence_reason": pl.String,
    "kl_neutral": pl.Float64,  # KL(steered ‖ unsteered) per token on the neutral texts (prompted: null)
    "plan": pl.String,  # the steering plan (`--steer` flags) this row followed too, null for none
}


GROUP_SEED_STRIDE = 1009  # generation group g of an eval samples with seed + g × this (cross effects rely on it)


@dataclass(frozen=True)
class Variant:
    """Which extracted vector to steer with, and how it is scaled."""

    position: str = "response_avg"
    aggregator: str = "mean_diff"
    norm: str = "raw"

    @property
    def label(self) -> str:
        return f"{self.position}-{self.aggregator}-{self.norm}"


@dataclass(frozen=True)
class EvalSpec:
    coefficients: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    layers: tuple[int, ...] | None = None  # None: `default_layers`
    variants: tuple[Variant, ...] = (Variant(),)
    questions: int | None = None  # first N evaluation questions (None: all)
    samples: int = 1  # per question and cell
    random_seeds: int = 2  # K random directions per random cell (0: no random baseline)
    positions: str = "all"  # where steering is added (steering.POSITION_MODES)
    adaptive: bool = False
    rounds: int = 5
    alpha_start: float = 1.0
    max_alpha: float = 16.0
    plots: bool = True
    plan: tuple[str, ...] = ()  # `--steer` terms: every steered and random row follows them; a `plan` cell alone
    sweep: bool = True  # False: no vector sweep, the plan alone against the baselines

    @property
    def identity(self) -> dict[str, Any]:
        """What the results depend on: plots aside, and the plan fields only when used (so an eval
        saved before plans existed keeps its key)."""
        out = {k: v for k, v in asdict(self).items() if k != "plots"}
        if not self.plan:
            out.pop("plan")
        if self.sweep:
            out.pop("sweep")
        return out


def default_layers(num_layers: int) -> list[int]:
    """About five layers over the middle half of the network, where persona vectors steer best."""
    low, high = max(1, round(num_layers * 0.25)), max(1, round(num_layers * 0.75))
    step = max(1, (high - low) // 4)
    return list(range(low, high + 1, step))


def random_direction(reference: torch.Tensor, seed: int, layer: int) -> torch.Tensor:
    """A Gaussian direction with ‖reference‖, the same for a (seed, layer) across runs and variants."""
    generator = torch.Generator().manual_seed(1_000_003 * (seed + 1) + layer)
    r = torch.randn(reference.shape[-1], generator=generator, dtype=torch.float32)
    return r / r.norm() * reference.float().norm()


def grid_runner(settings: Settings, lm: ModelHandle) -> Callable[..., Iterator[tuple[GridRow, Any]]]:
    """`run_grid` of the engine in use (HF: `steering.run_grid` batches; vLLM: one batch per (layer, α))."""
    from personactl.backends import open_engine

    return open_engine(settings, lm).run_grid


@dataclass
class Plan:
    """The prompt list every grid indexes: items 0..N-1 are (question, sample) without a system
    prompt, items N..2N-1 the same with the trait's positive system prompt."""

    questions: list[str]
    samples: int
    systems: list[str]
    prompt_ids: list[list[int]]

    @property
    def n_items(self) -> int:
        return len(self.questions) * self.samples

    def item(self, index: int) -> tuple[int, int]:
        return divmod(index % self.n_items, self.samples)


def make_plan(trait: Trait, tokenizer: Any, questions: int | None, samples: int) -> Plan:
    from personactl.model.chat_format import chat_messages, encode_prompt

    chosen = trait.questions.evaluation[:questions] if questions else list(trait.questions.evaluation)
    if not chosen:
        raise InputError(
            f"trait {trait.name} has no evaluation questions",
            hint="add held-out questions under questions.evaluation in the trait file",
        )
    systems = [trait.instructions[q % len(trait.instructions)].pos for q in range(len(chosen))]
    plain = [encode_prompt(tokenizer, chat_messages(None, q)) for q in chosen for _ in range(samples)]
    prompted = [
        encode_prompt(tokenizer, chat_messages(systems[i], q)) for i, q in enumerate(chosen) for _ in range(samples)
    ]
    return Plan(chosen, samples, systems, plain + prompted)


@dataclass(frozen=True)
class Tag:
    """What a grid row is, beyond its GridRow: condition, vector variant, random seed."""

    condition: str
    variant: Variant | None = None
    random_seed: int | None = None


def baseline_rows(plan: Plan, planned: bool = False) -> list[tuple[Tag, GridRow]]:
    """Unsteered and prompted rows, and with a steering plan (`planned`) one row of the plan alone
    per (question, sample)."""
    n = plan.n_items
    rows = [(Tag("unsteered"), GridRow(i, None, 0.0)) for i in range(n)]
    rows += [(Tag("prompted"), GridRow(n + i, None, 0.0)) for i in range(n)]
    return rows + [(Tag("plan"), GridRow(i, None, 0.0, planned=True)) for i in range(n) if planned]


def steered_rows(
    plan: Plan, variant: Variant, cells: Sequence[tuple[int, float]], random_seeds: int, planned: bool = False
) -> list[tuple[Tag, GridRow]]:
    """Steered rows for (layer, α) cells (α ≠ 0), and as many random rows when K > 0; with a
    steering plan (`planned`) both follow it too."""
    rows = []
    for layer, alpha in cells:
        grid = [r for r in plan_grid(plan.n_items, [layer], [alpha], planned) if not r.baseline]
        rows += [(Tag("steered", variant), r) for r in grid]
        if random_seeds:
            rows += [(Tag("random", variant, r.prompt_index % random_seeds), r) for r in grid]
    return rows


def generate_rows(
    runner: Callable[..., Any],
    plan: Plan,
    tagged: Sequence[tuple[Tag, GridRow]],
    directions: Callable[[Tag, int], torch.Tensor],
    *,
    sampling: Any,
    seed: int,
    batch_size: int,
    positions: str,
    on_chunk: Callable[[int, int], None] | None = None,
    steering_plan: Mapping[int, Sequence[Any]] | None = None,
) -> list[tuple[Tag, GridRow, Any]]:
    """Run every tagged row; rows sharing a direction set (baselines, the plan alone, the trait
    vector of one variant, one random seed) form one batched grid; `steering_plan` (layer → terms)
    acts on the rows marked `planned`. Results come back in input order."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (tag, row) in enumerate(tagged):
        if row.layer is None:
            key: tuple[Any, ...] = ("plan",) if row.planned else ("base",)
        else:
            key = (tag.condition, tag.variant, tag.random_seed)
        groups.setdefault(key, []).append(i)
    results: list[Any] = [None] * len(tagged)
    for g, indices in enumerate(groups.values()):
        layers = sorted({tagged[i][1].layer for i in indices if tagged[i][1].layer is not None})
        tag = tagged[indices[0]][0]
        dirs = {layer: directions(tag, layer) for layer in layers}
        planned = steering_plan is not None and any(tagged[i][1].planned for i in indices)
        grid = runner(
            plan.prompt_ids,
            [tagged[i][1] for i in indices],
            dirs,
            sampling=sampling,
            seed=seed + GROUP_SEED_STRIDE * g,
            batch_size=batch_size,
            positions=positions,
            on_chunk=on_chunk,
            **({"plan": steering_plan} if planned else {}),
        )
        for i, (_, gen) in zip(indices, grid, strict=True):
            results[i] = gen
    return [(tag, row, gen) for (tag, row), gen in zip(tagged, results, strict=True)]


def judge_rows(judge: Any, trait: Trait, plan: Plan, rows: Sequence[tuple[Tag, GridRow, Any]], on_done: Any) -> list:
    """Two judgements per response (trait rubric, coherence), in row order."""
    from personactl.steps.score import coherence_prompt

    prompts = []
    for _, row, gen in rows:
        question = plan.questions[plan.item(row.prompt_index)[0]]
        prompts += [trait.judge_prompt(question, gen.text), coherence_prompt(question, gen.text)]
    judgements = judge.judge(prompts, on_done)
    return list(zip(judgements[0::2], judgements[1::2], strict=True))


def to_records(
    plan: Plan, rows, judgements, norms: Callable[[Tag, int], float], round_: int, plan_spec: str | None = None
) -> list[dict]:
    records = []
    for (tag, row, gen), (trait_j, coherence_j) in zip(rows, judgements, strict=True):
        q, s = plan.item(row.prompt_index)
        v = tag.variant
        records.append(
            {
                "condition": tag.condition,
                "position": v.position if v else None,
                "aggregator": v.aggregator if v else None,
                "norm_mode": v.norm if v else None,
                "layer": row.layer,
                "coefficient": row.coefficient,
                "random_seed": tag.random_seed,
                "round": round_,
                "question_index": q,
                "sample_index": s,
                "question": plan.questions[q],
                "system_prompt": plan.systems[q] if tag.condition == "prompted" else None,
                "vector_norm": norms(tag, row.layer) if row.layer is not None else None,
                "text": gen.text,
                "n_tokens": len(gen.token_ids),
                "finish_reason": gen.finish_reason,
                "trait_score": trait_j.score,
                "trait_reason": trait_j.reason,
                "coherence_score": coherence_j.score,
                "coherence_reason": coherence_j.reason,
                "kl_neutral": 0.0 if tag.condition == "unsteered" else None,  # steered/random: `with_kl_neutral`
                "plan": plan_spec if row.planned else None,
            }
        )
    return records


@dataclass
class Search:
    """Adaptive state of one (variant, layer): doubling until broken, then bisection."""

    good: float = 0.0  # largest α known coherent (0: the unsteered start)
    bad: float | None = None  # smallest α known broken
    next: float | None = None
    done: bool = False

    def update(self, alpha: float, coherent: bool | None, max_alpha: float) -> None:
        if coherent:
            self.good = alpha
        else:  # broken, or no coherence score at all: do not go further
            self.bad = alpha
        if self.bad is None:
            self.done = alpha >= max_alpha
            self.next = min(2 * alpha, max_alpha)
        else:
            self.next = (self.good + self.bad) / 2


def _mean(values: Sequence[float | None]) -> float | None:
    scored = [v for v in values if v is not None]
    return sum(scored) / len(scored) if scored else None


def run_eval(
    *,
    runner: Callable[..., Any],
    judge: Any,
    trait: Trait,
    plan: Plan,
    spec: EvalSpec,
    layers: Sequence[int],
    directions: dict[Variant, dict[int, torch.Tensor]],
    threshold: float,
    sampling: Any,
    seed: int,
    batch_size: int,
    on_phase: Callable[[str, int | None], None] = lambda what, total: None,
    on_chunk: Callable[[int, int], None] | None = None,
    on_judged: Callable[[Any], None] = lambda j: None,
    steering_plan: ResolvedPlan | None = None,
) -> pl.DataFrame:
    """Generate and judge every cell (grid or adaptive); one row per response. With a steering
    plan, every steered and random row follows it and a `plan` cell runs it alone."""
    planned = bool(steering_plan and steering_plan.terms)
    by_layer = steering_plan.by_layer() if planned else None
    plan_spec = steering_plan.spec() if planned else None

    def direction(tag: Tag, layer: int) -> torch.Tensor:
        v = directions[tag.variant][layer]
        return random_direction(v, tag.random_seed, layer) if tag.condition == "random" else v

    def norm(tag: Tag, layer: int) -> float:
        return float(directions[tag.variant][layer].float().norm())

    def execute(tagged: list[tuple[Tag, GridRow]], round_: int, label: str) -> list[dict]:
        on_phase(f"eval: generate {label}", len(tagged))
        rows = generate_rows(
            runner,
            plan,
            tagged,
            direction,
            sampling=sampling,
            seed=seed + 100_003 * round_,
            batch_size=batch_size,
            positions=spec.positions,
            on_chunk=on_chunk,
            steering_plan=by_layer,
        )
        on_phase(f"eval: judge {label}", 2 * len(rows))
        judged = judge_rows(judge, trait, plan, rows, on_judged)
        return to_records(plan, rows, judged, norm, round_, plan_spec)

    if not spec.adaptive:
        cells = [(layer, a) for layer in layers for a in spec.coefficients if a != 0]
        tagged = baseline_rows(plan, planned)
        for variant in spec.variants:
            tagged += steered_rows(plan, variant, cells, spec.random_seeds, planned)
        return pl.DataFrame(execute(tagged, 0, "grid"), schema=SAMPLES_SCHEMA)
    records = execute(baseline_rows(plan, planned), 0, "baselines")
    records += _adaptive_rounds(execute, plan, spec, layers, threshold, planned)
    return pl.DataFrame(records, schema=SAMPLES_SCHEMA)


def _adaptive_rounds(
    execute: Callable[[list[tuple[Tag, GridRow]], int, str], list[dict]],
    plan: Plan,
    spec: EvalSpec,
    layers: Sequence[int],
    threshold: float,
    planned: bool,
) -> list[dict]:
    """`--adaptive`: per (variant, layer), double α while coherent, then bisect; `rounds` probes."""
    records: list[dict] = []
    searches = {(v, layer): Search(next=spec.alpha_start) for v in spec.variants for layer in layers}
    for round_ in range(1, spec.rounds + 1):
        active = [(key, s) for key, s in searches.items() if not s.done]
        if not active:
            break
        tagged = []
        for (variant, layer), s in active:
            tagged += steered_rows(plan, variant, [(layer, s.next)], spec.random_seeds, planned)
        new = execute(tagged, round_, f"round {round_}/{spec.rounds}")
        records += new
        for (variant, layer), s in active:
            coherence = _mean(
                [
                    r["coherence_score"]
                    for r in new
                    if r["condition"] == "steered"
                    and r["layer"] == layer
                    and r["position"] == variant.position
                    and r["aggregator"] == variant.aggregator
                    and r["norm_mode"] == variant.norm
                ]
            )
            s.update(s.next, None if coherence is None else coherence >= threshold, spec.max_alpha)
    return records


KLMeasure = Callable[[Mapping[int, torch.Tensor], Sequence[tuple[int, float]]], list[float]]


def with_kl_neutral(
    samples: pl.DataFrame, measure: KLMeasure, directions: dict[Variant, dict[int, torch.Tensor]]
) -> pl.DataFrame:
    """Fill `kl_neutral` on steered and random rows: one `measure` call per direction set (a
    variant's trait vector, or one random seed of it) over the distinct (layer, α) cells it has."""
    keys = ["condition", "position", "aggregator", "norm_mode", "random_seed"]
    steered = samples.filter(pl.col("condition").is_in(["steered", "random"]))
    found: list[dict[str, Any]] = []
    for key, group in steered.group_by(keys, maintain_order=True):
        condition, position, aggregator, norm, seed = key
        vectors = directions[Variant(position, aggregator, norm)]
        cells = sorted(set(zip(group["layer"].to_list(), group["coefficient"].to_list(), strict=True)))
        layers = {layer for layer, _ in cells}
        if condition == "random":
            dirs = {layer: random_direction(vectors[layer], seed, layer) for layer in layers}
        else:
            dirs = {layer: vectors[layer] for layer in layers}
        values = measure(dirs, cells)
        found += [
            dict(zip(keys, key, strict=True), layer=layer, coefficient=alpha, _kl=value)
            for (layer, alpha), value in zip(cells, values, strict=True)
        ]
    if not found:
        return samples
    table = pl.DataFrame(found, schema={**{k: SAMPLES_SCHEMA[k] for k in keys}, "layer": pl.Int32,
                                         "coefficient": pl.Float64, "_kl": pl.Float64})  # fmt: skip
    joined = samples.join(table, on=[*keys, "layer", "coefficient"], how="left", nulls_equal=True)
    return joined.with_columns(pl.coalesce("_kl", "kl_neutral").alias("kl_neutral")).drop("_kl")


def kl_model(settings: Settings, lm: ModelHandle) -> Any:
    """The Hugging Face model that computes kl_neutral: the engine's own on the HF backend; on vLLM
    (no full distributions) the same checkpoint at the engine's dtype, loaded once the engine is
    closed (generation and judging are done) so both never hold accelerator memory at once."""
    from personactl.backends import open_engine

    engine = open_engine(settings, lm)
    if engine.full_distributions:
        return lm
    from personactl.model.loading import load_model

    engine.close()
    return load_model(
        settings.model,
        dtype=str(lm.dtype).removeprefix("torch."),
        device=settings.device,
        device_map=settings.device_map,
        max_memory=settings.max_memory,
        revision=settings.revision,
        trust_remote_code=settings.trust_remote_code,
        cache_dir=settings.cache_dir,
        token=settings.hf_token.get_secret_value() if settings.hf_token else None,
        log=lambda message: None,
    )


def file_sha256(path: Any) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def eval_fingerprint(
    settings: Settings,
    trait: Trait,
    spec: EvalSpec,
    vector_path: Path | None,
    sampling: Sampling,
    plan_files: Sequence[dict[str, str]] = (),
) -> dict[str, Any]:
    """Everything an eval's result depends on: same fingerprint, same eval (`eval_step` skips it,
    `run --dry-run` reports it as skipped). `vector_path` None: a steering plan alone;
    `plan_files`: each plan term with its vector file's hash (`plan_fingerprint`)."""
    from personactl.model.capability_cost import neutral_texts, texts_sha256
    from personactl.steps.score import LOCAL_PREFIX

    local = settings.judge_model.startswith(LOCAL_PREFIX)
    return {
        "kind": "eval",
        "vector_sha256": None if vector_path is None else file_sha256(vector_path),
        "trait_sha256": trait.sha256,
        "spec": spec.identity,
        **({"plan": list(plan_files)} if plan_files else {}),
        "sampling": asdict(sampling),
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        "model": settings.model,
        "revision": settings.revision,
        "dtype": settings.dtype,
        "backend": getattr(settings, "backend", "hf"),
        "judge_model": settings.judge_model,
        "judge_base_url": None if local else settings.judge_base_url,
        "judge_mode": "local" if local else settings.judge_mode,
        "kl_neutral_texts_sha256": texts_sha256(neutral_texts()),
    }


def plan_fingerprint(workspace: Workspace, model_slug: str, specs: Sequence[str]) -> list[dict[str, str]]:
    """Each `--steer` term as written back and its vector file's hash, found before any model loads
    (a bad term fails here, before the model loads)."""
    from personactl.core.steer_plan import parse_term, split_persona

    out = []
    for spec in specs:
        term = parse_term(spec)
        name, persona = split_persona(term.vector)
        path = workspace.find_vector(name, model_slug, persona)
        out.append({"spec": term.spec(), "vector_sha256": file_sha256(path)})
    return out


def eval_step(
    *,
    settings: Settings,
    workspace: Workspace,
    trait: Trait,
    spec: EvalSpec,
    load: Callable[[], ModelHandle],
    load_judge: Callable[[str], Any] | None = None,
    vector_spec: str | None = None,
    sampling: Sampling | None = None,
    max_kl: float | None = None,
    force: bool = False,
    on_phase: Callable[[str, int | None], None] = lambda what, total: None,
    on_chunk: Callable[[int, int], None] | None = None,
    on_judged: Callable[[Any], None] = lambda j: None,
    on_judge: Callable[[Any], None] = lambda judge: None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Skip when an eval with the same inputs exists (a new coherence threshold or KL budget only
    redoes the summary and plots from the saved samples); else generate, judge, measure
    kl_neutral, summarise, save. `max_kl` None: `eval_summary.DEFAULT_MAX_KL`."""
    max_kl = check_max_kl(DEFAULT_MAX_KL if max_kl is None else max_kl)
    sampling = sampling or Sampling(settings.max_new_tokens, settings.temperature, settings.top_p)
    slug = resolve_model(settings.model).slug
    vector_path = _vector_path(workspace, spec, vector_spec or trait.name, slug)  # before loading: hashed
    _, threshold = effective_thresholds(settings, trait)
    fingerprint = eval_fingerprint(
        settings, trait, spec, vector_path, sampling, plan_fingerprint(workspace, slug, spec.plan)
    )
    out = StepArtifact(
        workspace,
        workspace.eval_path(slug, trait.name, fingerprint_of(fingerprint)),
        "eval",
        fingerprint,
        {"trait": trait.name, "vector": None if vector_path is None else str(vector_path), "model": settings.model},
    )
    if out.current(force):
        return _saved_eval(out, settings, spec, trait.name, threshold, max_kl)

    lm = load()
    steering_plan = _resolved_plan(settings, workspace, lm, spec)
    layers, directions = _steering_directions(workspace, spec, vector_path, lm)
    plan = make_plan(trait, lm.tokenizer, spec.questions, spec.samples)
    samples, judge, timings = _generate_judge_measure(
        settings=settings,
        workspace=workspace,
        lm=lm,
        trait=trait,
        plan=plan,
        spec=spec,
        layers=layers,
        directions=directions,
        threshold=threshold,
        sampling=sampling,
        load_judge=load_judge,
        on_phase=on_phase,
        on_chunk=on_chunk,
        on_judged=on_judged,
        on_judge=on_judge,
        steering_plan=steering_plan,
    )
    cells, summary = summarize(samples, threshold, max_kl)
    if steering_plan.terms:
        summary["plan"] = steering_plan.describe()
    subtitle = plot_subtitle(settings.model, settings.judge_model, len(plan.questions), spec.samples)
    files = _write_cells_and_plots(out.path, cells, summary, spec, trait.name, subtitle)
    out.commit(
        samples.write_parquet,
        settings=settings,
        model=lm.describe(),
        trait={"name": trait.name, "sha256": trait.sha256},
        vector={"path": None if vector_path is None else str(vector_path), "sha256": fingerprint["vector_sha256"]},
        judge={"model": settings.judge_model, "identity": judge.identity},
        layers=layers,
        counts={"responses": samples.height, "questions": len(plan.questions), "samples": spec.samples},
        timings=timings,
        summary=summary,
        files=files,
    )
    return samples, out.done(**summary, files=files, seconds=timings["seconds"])


def _saved_eval(
    out: StepArtifact, settings: Settings, spec: EvalSpec, title: str, threshold: float, max_kl: float
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """A finished eval with the same inputs: its saved summary, or, when only the coherence threshold
    or the KL budget changed, the summary, cells and plots redone from its samples (no generation)."""
    samples = pl.read_parquet(out.path)
    manifest = out.manifest()
    saved = manifest.get("summary", {})
    if (saved.get("coherence_threshold"), saved.get("max_kl")) == (threshold, max_kl):
        return samples, out.skipped(**{**saved, "files": manifest["files"]})
    cells, summary = summarize(samples, threshold, max_kl)
    if saved.get("plan"):
        summary["plan"] = saved["plan"]
    questions = manifest.get("counts", {}).get("questions")
    subtitle = plot_subtitle(settings.model, settings.judge_model, questions, spec.samples)
    files = _write_cells_and_plots(out.path, cells, summary, spec, title, subtitle)
    out.amend(summary=summary, files=files)
    return samples, out.skipped(**{"resummarized": True, **summary, "files": files})


def _vector_path(workspace: Workspace, spec: EvalSpec, vector_spec: str, slug: str) -> Path | None:
    """The swept vector's file (None for a steering plan alone), checked against the spec."""
    if spec.sweep:
        return workspace.find_vector(vector_spec, slug)
    if not spec.plan:
        raise InputError("nothing to evaluate", hint="pass --vector NAME (a sweep) and/or --steer SPEC (a plan)")
    if spec.adaptive:
        raise InputError("--adaptive searches α for a swept vector", hint="pass --vector NAME too, or drop --adaptive")
    return None


def _resolved_plan(settings: Settings, workspace: Workspace, lm: ModelHandle, spec: EvalSpec) -> ResolvedPlan:
    """`spec.plan` resolved for the loaded model (units of the first variant's norm mode), refused
    when the engine lacks one of its operations."""
    from personactl.backends import check_plan_ops, open_engine
    from personactl.steps.plan import resolve_plan

    first = spec.variants[0]
    resolved = resolve_plan(
        spec.plan, workspace=workspace, lm=lm, position=first.position, aggregator=first.aggregator, norm=first.norm
    )
    check_plan_ops(open_engine(settings, lm), resolved.ops)
    return resolved


def _steering_directions(
    workspace: Workspace, spec: EvalSpec, vector_path: Path | None, lm: ModelHandle
) -> tuple[list[int], dict[Variant, dict[int, torch.Tensor]]]:
    """The layers to evaluate (`spec.layers`, else `default_layers`), checked, and each variant's
    direction at each of them (none without a swept vector)."""
    if vector_path is None:
        return [], {}
    vector = load_for_model(workspace, str(vector_path), lm).vector
    num_layers = lm.num_layers
    layers = check_steering_layers(list(spec.layers or default_layers(num_layers)), num_layers)
    if spec.adaptive and not (0 < spec.alpha_start <= spec.max_alpha):
        raise InputError("--adaptive needs 0 < --alpha-start ≤ --alpha-cap")
    directions = {
        v: {layer: vector.direction(layer, v.position, v.aggregator, v.norm) for layer in layers} for v in spec.variants
    }
    return layers, directions


@contextmanager
def judging(
    settings: Settings, workspace: Workspace, load_judge: Callable[[str], Any] | None
) -> Iterator[RemoteJudge | LocalJudge]:
    """The judge `settings` name, over the workspace's judge cache (closed when done)."""
    cache = JudgeCache(workspace.judge_cache_path)
    try:
        yield make_judge(settings, cache, load=load_judge)
    finally:
        cache.close()


def _generate_judge_measure(
    *,
    settings: Settings,
    workspace: Workspace,
    lm: ModelHandle,
    trait: Trait,
    plan: Plan,
    spec: EvalSpec,
    layers: list[int],
    directions: dict[Variant, dict[int, torch.Tensor]],
    threshold: float,
    sampling: Sampling,
    load_judge: Callable[[str], Any] | None,
    on_phase: Callable[[str, int | None], None],
    on_chunk: Callable[[int, int], None] | None,
    on_judged: Callable[[Any], None],
    on_judge: Callable[[Any], None],
    steering_plan: ResolvedPlan,
) -> tuple[pl.DataFrame, RemoteJudge | LocalJudge, dict[str, float]]:
    """The eval's work: generate and judge every cell, then measure kl_neutral (not under a steering
    plan: its terms are not part of what the KL measure steers with, so those cells get none).
    Returns the samples, the judge and the timings (seconds in all, and of the kl_neutral phase)."""
    start = time.perf_counter()
    with judging(settings, workspace, load_judge) as judge:
        on_judge(judge)
        samples = run_eval(
            runner=grid_runner(settings, lm),
            judge=judge,
            trait=trait,
            plan=plan,
            spec=spec,
            layers=layers,
            directions=directions,
            threshold=threshold,
            sampling=sampling,
            seed=settings.seed,
            batch_size=settings.batch_size,
            on_phase=on_phase,
            on_chunk=on_chunk,
            on_judged=on_judged,
            steering_plan=steering_plan,
        )
    generated = time.perf_counter()
    if not steering_plan.terms:
        on_phase("eval: kl_neutral on the neutral texts", None)
        kl_lm = kl_model(settings, lm)
        measure = NeutralKL(kl_lm.model, kl_lm.tokenizer, rows_per_forward=settings.batch_size)
        samples = with_kl_neutral(samples, measure, directions)
    end = time.perf_counter()
    return samples, judge, {"seconds": round(end - start, 2), "kl_neutral_seconds": round(end - generated, 2)}


def plot_subtitle(model: str, judge: str, questions: int | None, samples: int) -> str:
    """The facts line under a plot's title: what was steered, who judged, over how many questions."""
    asked = f"{questions} held-out questions × {samples} sample{'s' if samples != 1 else ''}" if questions else None
    return " · ".join(p for p in (f"model {model}", f"judge {judge}", asked) if p)


def _write_cells_and_plots(
    output: Path, cells: pl.DataFrame, summary: dict[str, Any], spec: EvalSpec, title: str, subtitle: str
) -> dict[str, Any]:
    """The cells table and (unless `spec.plots` is off) each variant's PNG plots beside `output` (the
    samples table, which the step commits itself); returns the manifest's `files`."""
    stem = output.name.removesuffix(".parquet")
    cells_path = output.with_name(f"{stem}.cells.parquet")
    with atomic_path(cells_path) as tmp:
        cells.write_parquet(tmp)
    files: dict[str, Any] = {"samples": str(output), "cells": str(cells_path), "plots": []}
    if spec.plots and spec.sweep:  # a plan alone has no layer × α to plot
        for v in spec.variants:
            files["plots"] += _plot_variant(output, cells, summary, v, title, subtitle, alone=len(spec.variants) == 1)
    return files


def _plot_variant(
    output: Path, cells: pl.DataFrame, summary: dict[str, Any], v: Variant, title: str, subtitle: str, alone: bool
) -> list[str]:
    """Curves and heatmap of one vector variant's cells (with the baselines), named after the
    variant unless it is the eval's only one."""
    from personactl.steps.plots import plot_curves, plot_heatmap

    mine = cells.filter(
        pl.col("position").is_null()
        | (
            (pl.col("position") == v.position)
            & (pl.col("aggregator") == v.aggregator)
            & (pl.col("norm_mode") == v.norm)
        )
    )
    threshold = summary["coherence_threshold"]
    stem = output.name.removesuffix(".parquet")
    suffix = "" if alone else f"-{v.label}"
    name = f"{title} · {v.label}"
    curves = output.with_name(f"{stem}.curves{suffix}.png")
    heatmap = output.with_name(f"{stem}.heatmap{suffix}.png")
    return [
        str(plot_curves(mine, threshold, curves, name, summary.get("max_kl"), subtitle)),
        str(plot_heatmap(mine, threshold, heatmap, name, subtitle)),
    ]
