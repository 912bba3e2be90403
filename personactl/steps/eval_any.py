"""`eval` with or without a judge, chosen in one place: the judged eval (`steps.evaluate`) or the
judge-free proxy sweep (`steps.proxy`). `personactl eval` and `personactl run` both call it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from personactl.backends import Sampling
from personactl.steps.evaluate import EvalSpec, eval_step
from personactl.steps.proxy import proxy_step

if TYPE_CHECKING:
    import polars as pl

    from personactl.model.loading import ModelHandle
    from personactl.settings import Settings
    from personactl.store.traits import Trait
    from personactl.store.workspace import Workspace


def eval_or_proxy(
    *,
    settings: Settings,
    workspace: Workspace,
    trait: Trait,
    spec: EvalSpec,
    load: Callable[[], ModelHandle],
    proxy: bool = False,
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
    """Evaluate `trait`'s vector: with `proxy`, the judge-free proxy sweep over `spec.layers` with the
    first variant's position and aggregator on `spec.questions` (the judge, grid, KL and chunk
    arguments are unused); else the judged eval of `spec`. `sampling` None: from `settings`.
    Returns the step's (table, summary); a proxy summary has a "label", a judged one does not."""
    sampling = sampling or Sampling(settings.max_new_tokens, settings.temperature, settings.top_p)
    if proxy:
        variant = spec.variants[0]
        return proxy_step(
            settings=settings,
            workspace=workspace,
            trait=trait,
            load=load,
            layers=spec.layers,
            position=variant.position,
            aggregator=variant.aggregator,
            questions=spec.questions,
            sampling=sampling,
            vector_spec=vector_spec,
            plots=spec.plots,
            force=force,
            on_phase=on_phase,
        )
    return eval_step(
        settings=settings,
        workspace=workspace,
        trait=trait,
        spec=spec,
        load=load,
        load_judge=load_judge,
        vector_spec=vector_spec,
        sampling=sampling,
        max_kl=max_kl,
        force=force,
        on_phase=on_phase,
        on_chunk=on_chunk,
        on_judged=on_judged,
        on_judge=on_judge,
    )
