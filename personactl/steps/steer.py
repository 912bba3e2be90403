"""`personactl steer` as a workspace step: resolve the vector, run the grid, save the table."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import polars as pl

from personactl.backends import Sampling
from personactl.core.ranges import check_in_range
from personactl.errors import InputError
from personactl.model.chat_format import chat_messages, encode_prompt
from personactl.model.steering import plan_grid
from personactl.store.vectors import PersonaVector

if TYPE_CHECKING:
    from personactl.model.loading import ModelHandle
    from personactl.settings import Settings
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
}


def default_layer(num_layers: int) -> int:
    """Middle of the network: a reasonable first guess before `eval` picks a layer with numbers."""
    return max(1, num_layers // 2)


def steer_step(
    *,
    settings: Settings,
    workspace: Workspace,
    lm: ModelHandle,
    vector_spec: str,
    prompts: Sequence[str],
    system_prompt: str | None,
    layers: list[int] | None,
    coefficients: list[float],
    position: str,
    aggregator: str,
    positions: str,
    norm: str,
    sampling: Sampling,
    on_start: Callable[[int], None] = lambda n: None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    from personactl.backends import open_engine

    if not prompts or any(not p.strip() for p in prompts):
        raise InputError("empty prompt", hint="pass --prompt TEXT (or --prompts-file with one prompt per line)")
    path = workspace.find_vector(vector_spec, lm.source.slug)
    vector = PersonaVector.load(path)
    vector.check_compatible(lm.describe())
    warnings = []
    if vector.metadata.get("model") != lm.source.spec:
        warnings.append(
            f"the vector was extracted from {vector.metadata.get('model')}, you are steering "
            f"{lm.source.spec} (same shape, so it runs; is that intended?)"
        )
    layers = check_in_range(layers or [default_layer(lm.num_layers)], lm.num_layers)
    if 0 in layers:
        raise InputError("layer 0 is the embeddings, not a steering target", hint="steer at layers 1..L")
    directions = {layer: vector.direction(layer, position, aggregator, norm) for layer in layers}
    prompt_ids = [encode_prompt(lm.tokenizer, chat_messages(system_prompt, p)) for p in prompts]
    rows = plan_grid(len(prompts), layers, coefficients)
    on_start(len(rows))
    start = time.perf_counter()
    records = []
    grid = open_engine(settings, lm).run_grid(
        prompt_ids,
        rows,
        directions,
        sampling=sampling,
        seed=settings.seed,
        batch_size=settings.batch_size,
        positions=positions,
        on_chunk=on_chunk,
    )
    for row, gen in grid:
        norm_value = float(directions[row.layer].float().norm()) if row.layer is not None else 0.0
        records.append(
            {
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
            }
        )
    seconds = time.perf_counter() - start
    table = pl.DataFrame(records, schema=STEER_SCHEMA)
    label = vector.metadata.get("trait") or path.stem
    output = workspace.steer_run_path(lm.source.slug, label)
    from personactl.settings import masked_dump
    from personactl.store.workspace import atomic_path

    with atomic_path(output) as tmp:
        table.write_parquet(tmp)
    run_info = {
        "vector": str(path),
        "vector_trait": vector.metadata.get("trait"),
        "layers": layers,
        "coefficients": coefficients,
        "position": position,
        "aggregator": aggregator,
        "positions": positions,
        "norm": norm,
        "sampling": sampling.__dict__,
        "seed": settings.seed,
    }
    workspace.write_manifest(
        output,
        "steer",
        model=lm.describe(),
        settings=masked_dump(settings),
        run=run_info,
        counts={"rows": table.height, "prompts": len(prompts)},
        timings={
            "seconds": round(seconds, 2),
            "tokens_per_second": round(int(table["n_tokens"].sum()) / max(seconds, 1e-9), 1),
        },
    )
    return table, {
        "artifact": str(output),
        **run_info,
        "rows": table.height,
        "seconds": round(seconds, 2),
        "warnings": warnings,
    }
