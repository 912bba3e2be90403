"""`personactl steer` as a workspace step: resolve the vector, run the grid, save the table."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import polars as pl

from personactl.backends import Sampling, check_plan_ops, open_engine
from personactl.core.ranges import check_steering_layers
from personactl.errors import InputError
from personactl.model.chat_format import chat_messages, encode_prompt
from personactl.model.steering import plan_grid
from personactl.steps.condition import NO_CONDITION, check_condition, condition_gate, resolve_condition
from personactl.steps.plan import resolve_plan
from personactl.steps.skeleton import RunArtifact
from personactl.store.vectors import load_for_model

if TYPE_CHECKING:
    import torch

    from personactl.backends import Generation
    from personactl.core.condition_spec import ConditionSpec
    from personactl.core.steer_plan import PlanTerm
    from personactl.model.loading import ModelHandle
    from personactl.model.steering import GridRow
    from personactl.settings import Settings
    from personactl.steps.condition import ConditionGate
    from personactl.steps.plan import ResolvedPlan
    from personactl.store.vectors import LoadedVector
    from personactl.store.workspace import Workspace

STEER_SCHEMA = {
    "prompt_index": pl.Int32,
    "prompt": pl.String,
    "system_prompt": pl.String,
    "baseline": pl.Boolean,  # True for the unsteered row of each prompt (α = 0)
    "layer": pl.Int32,  # null for the baseline
    "coefficient": pl.Float64,
    "norm_mode": pl.String,
    "vector_norm": pl.Float64,  # ‖v‖ after the norm mode, at this layer
    "effective_norm": pl.Float64,  # |α|·‖v‖: the size of what is added
    "text": pl.String,
    "n_prompt_tokens": pl.Int32,
    "n_tokens": pl.Int32,
    "finish_reason": pl.String,
    "plan": pl.String,  # the steering plan this row followed too (`--steer` flags), null for none
    "condition_projection": pl.Float64,  # `--when`: the prompt's projection on the condition vector
    "condition_passed": pl.Boolean,  # `--when`: whether steering acted on this prompt (null: no condition)
}


def default_layer(num_layers: int) -> int:
    """Middle of the network: a reasonable first guess before `eval` picks a layer with numbers."""
    return max(1, num_layers // 2)


def steer_step(
    *,
    settings: Settings,
    workspace: Workspace,
    lm: ModelHandle,
    vector_spec: str | None,
    prompts: Sequence[str],
    system_prompt: str | None,
    layers: list[int] | None,
    coefficients: list[float],
    position: str,
    aggregator: str,
    positions: str,
    norm: str,
    sampling: Sampling,
    plan_specs: Sequence[str | PlanTerm] = (),
    condition: str | ConditionSpec | None = None,
    on_start: Callable[[int], None] = lambda n: None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Answer every prompt unsteered and at each layer × α with the vector `vector_spec` names, and
    by the steering plan of `plan_specs` (with the swept vector, or alone when there is none); save
    the table as a new `steer-<time>` artifact and return it with a summary (warnings included).
    With `condition` (`--when`), only prompts above its threshold are steered (`steps.condition`)."""
    if not prompts or any(not p.strip() for p in prompts):
        raise InputError("empty prompt", hint="pass --prompt TEXT (or --prompts-file with one prompt per line)")
    if vector_spec is None and not plan_specs:
        raise InputError("nothing to steer with", hint="pass --vector NAME (a sweep) and/or --steer SPEC (a plan)")
    engine = open_engine(settings, lm)
    plan = resolve_plan(plan_specs, workspace=workspace, lm=lm, position=position, aggregator=aggregator, norm=norm)
    check_plan_ops(engine, plan.ops)
    loaded, layers, directions = _swept(workspace, lm, vector_spec, layers, position, aggregator, norm)
    prompt_ids = [encode_prompt(lm.tokenizer, chat_messages(system_prompt, p)) for p in prompts]
    rows = plan_grid(len(prompts), layers, coefficients, planned=bool(plan.terms))
    gate = _gate(condition, settings, workspace, lm, prompt_ids, position, aggregator)
    runs = gate.runs(rows) if gate else rows
    on_start(len(runs))
    start = time.perf_counter()
    grid = engine.run_grid(
        prompt_ids,
        runs,
        directions,
        sampling=sampling,
        seed=settings.seed,
        batch_size=settings.batch_size,
        positions=positions,
        on_chunk=on_chunk,
        **({"plan": plan.by_layer()} if plan.terms else {}),
    )
    spec = plan.spec() or None
    records = [
        {**_record(row, gen, prompts, prompt_ids, system_prompt, norm, directions, spec), **_gated(gate, row)}
        for row, gen in (gate.fill(rows, grid) if gate else grid)
    ]
    seconds = time.perf_counter() - start
    table = pl.DataFrame(records, schema=STEER_SCHEMA)
    run_info = _run_info(
        loaded, plan, gate, layers=layers, coefficients=coefficients, position=position, aggregator=aggregator
    )
    run_info.update(positions=positions, norm=norm, sampling=sampling.__dict__, seed=settings.seed)
    label = loaded.label if loaded else plan.terms[0].label
    out = RunArtifact(workspace, workspace.steer_run_path(lm.source.slug, label), "steer", summary=run_info)
    out.commit(
        table.write_parquet,
        settings=settings,
        model=lm.describe(),
        run=run_info,
        counts={"rows": table.height, "prompts": len(prompts)},
        timings={
            "seconds": round(seconds, 2),
            "tokens_per_second": round(int(table["n_tokens"].sum()) / max(seconds, 1e-9), 1),
        },
    )
    warnings = ([loaded.warning] if loaded and loaded.warning else []) + plan.warnings
    return table, out.done(rows=table.height, seconds=round(seconds, 2), warnings=warnings)


def _run_info(
    loaded: LoadedVector | None, plan: ResolvedPlan, gate: ConditionGate | None, **run: Any
) -> dict[str, Any]:
    """What the manifest records of the run: the swept vector, the grid, the plan and the condition."""
    return {
        "vector": str(loaded.path) if loaded else None,
        "vector_trait": loaded.vector.metadata.get("trait") if loaded else None,
        **run,
        **({"plan": plan.describe()} if plan.terms else {}),
        **({"condition": gate.describe()} if gate else {}),
    }


def _gate(
    condition: str | ConditionSpec | None,
    settings: Settings,
    workspace: Workspace,
    lm: ModelHandle,
    prompt_ids: Sequence[Sequence[int]],
    position: str,
    aggregator: str,
) -> ConditionGate | None:
    """The `--when` gate over these prompts (None without a condition): projections read, decided."""
    if condition is None:
        return None
    check_condition(condition, settings.backend)  # the CLI checked before start-up; the Python API here
    resolved = resolve_condition(condition, workspace=workspace, lm=lm, position=position, aggregator=aggregator)
    return condition_gate(resolved, lm, prompt_ids, settings.extract_batch_tokens)


def _gated(gate: ConditionGate | None, row: GridRow) -> dict[str, Any]:
    return gate.columns(row) if gate else dict(NO_CONDITION)


def _swept(
    workspace: Workspace,
    lm: ModelHandle,
    vector_spec: str | None,
    layers: list[int] | None,
    position: str,
    aggregator: str,
    norm: str,
) -> tuple[LoadedVector | None, list[int], dict[int, torch.Tensor]]:
    """The swept vector, its checked layers and its directions there (none without a vector)."""
    if vector_spec is None:
        return None, [], {}
    loaded = load_for_model(workspace, vector_spec, lm)
    layers = check_steering_layers(layers or [default_layer(lm.num_layers)], lm.num_layers)
    return loaded, layers, {layer: loaded.vector.direction(layer, position, aggregator, norm) for layer in layers}


def _record(
    row: GridRow,
    gen: Generation,
    prompts: Sequence[str],
    prompt_ids: Sequence[Sequence[int]],
    system_prompt: str | None,
    norm: str,
    directions: Mapping[int, torch.Tensor],
    plan: str | None = None,
) -> dict[str, Any]:
    """One table row (`STEER_SCHEMA`): the prompt, where and how hard it was steered, the reply."""
    norm_value = float(directions[row.layer].float().norm()) if row.layer is not None else 0.0
    return {
        "prompt_index": row.prompt_index,
        "prompt": prompts[row.prompt_index],
        "system_prompt": system_prompt,
        "baseline": row.baseline,
        "layer": row.layer,
        "coefficient": row.coefficient,
        "norm_mode": norm,
        "vector_norm": norm_value,
        "effective_norm": abs(row.coefficient) * norm_value,
        "text": gen.text,
        "n_prompt_tokens": len(prompt_ids[row.prompt_index]),
        "n_tokens": len(gen.token_ids),
        "finish_reason": gen.finish_reason,
        "plan": plan if row.planned else None,
    }
