"""Conditional steering (`--when`): steer a row only when its prompt's projection on a condition
vector is above a threshold.

The projection is read before generation by one forward pass over the prompts that stops at the
condition's layer (`model.example_activations.read_examples`, position `prompt_end`: the last
prompt token, the same reading extraction makes), so it is decided once per prompt, from the prompt
alone, on any engine that reads activations in this process. The gate covers all steering of a
row, the swept α·v and the plan alike: a prompt below the threshold is not steered at all, and its
steered rows are its baseline's generation (bit-identical to the unsteered answer, not re-run).
`chat` and `serve` read one prompt at a time (`read_prompt`: a reply's conversation, a request's
messages) and generate a prompt below the threshold unsteered.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from personactl.backends import require_activations
from personactl.core.condition_spec import ConditionSpec, parse_condition
from personactl.core.ranges import check_steering_layers
from personactl.core.steer_plan import split_persona
from personactl.model.chat_format import EncodedExample
from personactl.store.vectors import load_for_model

if TYPE_CHECKING:
    from personactl.backends import Generation
    from personactl.model.loading import LoadedModel
    from personactl.model.steering import GridRow
    from personactl.store.vectors import LoadedVector
    from personactl.store.workspace import Workspace

PROMPTS_PER_READ = 64  # prompts per read_examples call: readings are [N, rows, H] fp32 until projected


def check_condition(spec: str | ConditionSpec, backend: str) -> ConditionSpec:
    """The parsed condition, refused before any engine starts where this process reads no activations."""
    condition = parse_condition(spec) if isinstance(spec, str) else spec
    require_activations(
        backend,
        "--when reads each prompt's activations before generation, which this backend does not expose here",
        hint="use --backend hf or mlx for conditional steering",
    )
    return condition


def unit_direction(loaded: LoadedVector, row: int, position: str, aggregator: str) -> torch.Tensor:
    """The condition vector's direction at `row`, [H] float32 of norm 1 (what a prompt is projected on)."""
    unit = loaded.vector.direction(row, position, aggregator, "unit").float()
    return unit / unit.norm()


@dataclass(frozen=True)
class Condition:
    """A condition resolved for a loaded model: the vector found and its unit direction at `layer`."""

    spec: ConditionSpec
    loaded: LoadedVector
    position: str
    aggregator: str
    unit: torch.Tensor  # [H] fp32, norm 1

    @property
    def layer(self) -> int:
        return self.spec.layer

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec.spec(),
            "vector": str(self.loaded.path),
            "trait": self.loaded.label,
            "layer": self.layer,
            "threshold": self.spec.threshold,
            "position": self.position,
            "aggregator": self.aggregator,
            "reads": "projection of the last prompt token on the unit direction",
        }


def resolve_condition(
    spec: str | ConditionSpec, *, workspace: Workspace, lm: LoadedModel, position: str, aggregator: str
) -> Condition:
    """The condition's vector found for `lm` (refused when made for another model), its layer checked."""
    spec = parse_condition(spec) if isinstance(spec, str) else spec
    name, persona = split_persona(spec.vector)
    loaded = load_for_model(workspace, name, lm, persona)
    check_steering_layers([spec.layer], lm.num_layers)
    position, aggregator = spec.position or position, spec.aggregator or aggregator
    return Condition(spec, loaded, position, aggregator, unit_direction(loaded, spec.layer, position, aggregator))


def prompt_projections(
    lm: LoadedModel, prompt_ids: Sequence[Sequence[int]], units: Mapping[int, torch.Tensor], batch_tokens: int = 8192
) -> dict[int, list[float]]:
    """Each prompt's last-token projection on `units[row]` (unit directions), per residual row."""
    from personactl.model.example_activations import read_examples

    rows = sorted(units)
    stacked = torch.stack([units[row].float().cpu() for row in rows])  # [R, H]
    out = torch.empty(len(prompt_ids), len(rows))
    for start in range(0, len(prompt_ids), PROMPTS_PER_READ):
        examples = [EncodedExample(tuple(ids), len(ids)) for ids in prompt_ids[start : start + PROMPTS_PER_READ]]
        readings = read_examples(
            lm.model,
            lm.layers,
            examples,
            pad_id=lm.tokenizer.pad_token_id,
            rows=rows,
            positions=("prompt_end",),
            batch_tokens=batch_tokens,
        )
        out[start : start + len(examples)] = torch.einsum("nrh,rh->nr", readings.values[:, 0], stacked)
    return {row: out[:, i].tolist() for i, row in enumerate(rows)}


@dataclass(frozen=True)
class ConditionGate:
    """Which prompts a condition lets steering act on, and the rows that must therefore run."""

    condition: Condition
    projections: list[float]  # per prompt
    passed: list[bool]  # per prompt: projection > threshold

    def runs(self, rows: Sequence[GridRow]) -> list[GridRow]:
        """The rows to generate: every baseline, and the steered rows of prompts that passed."""
        return [row for row in rows if row.baseline or self.passed[row.prompt_index]]

    def fill(
        self, rows: Sequence[GridRow], generated: Iterable[tuple[GridRow, Generation]]
    ) -> list[tuple[GridRow, Generation]]:
        """Every row in order with its generation: a gated-out row gets its prompt's baseline."""
        done = list(generated)
        baselines = {row.prompt_index: gen for row, gen in done if row.baseline}
        by_row = iter(done)
        return [
            next(by_row) if row.baseline or self.passed[row.prompt_index] else (row, baselines[row.prompt_index])
            for row in rows
        ]

    def columns(self, row: GridRow) -> dict[str, Any]:
        return {
            "condition_projection": self.projections[row.prompt_index],
            "condition_passed": self.passed[row.prompt_index],
        }

    def describe(self) -> dict[str, Any]:
        return {**self.condition.describe(), "projections": self.projections, "passed": sum(self.passed)}


def condition_gate(
    condition: Condition, lm: LoadedModel, prompt_ids: Sequence[Sequence[int]], batch_tokens: int
) -> ConditionGate:
    """Read every prompt's projection at the condition's layer and decide, once, which pass."""
    projections = prompt_projections(lm, prompt_ids, {condition.layer: condition.unit}, batch_tokens)[condition.layer]
    return ConditionGate(condition, projections, [p > condition.spec.threshold for p in projections])


def read_prompt(
    condition: Condition, lm: LoadedModel, prompt_ids: Sequence[int], batch_tokens: int = 8192
) -> dict[str, Any]:
    """One prompt's verdict (a chat turn, a served request): the reading `condition_gate` makes,
    with its projection and whether steering acts on it."""
    gate = condition_gate(condition, lm, [prompt_ids], batch_tokens)
    return {"spec": condition.spec.spec(), "projection": gate.projections[0], "steered": gate.passed[0]}


NO_CONDITION = {"condition_projection": None, "condition_passed": None}
