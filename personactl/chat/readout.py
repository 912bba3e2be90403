"""The chat's live readout: after each turn, what the model's activations on the conversation say.

Either a readout file's concepts (`readout train`) or the steering vector itself (`vector`). The
turn (templated conversation + the reply's generated tokens) is read in one forward pass of the
*unsteered* model, so a number measures the text the turn produced, is comparable across α, and
equals what `personactl monitor` reports for the same conversation. Per label, the projection is
averaged over the probe's layers at `prompt_end` (the model's state before it answers) and over the
reply's tokens (`response_avg`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personactl.backends import require_activations
from personactl.errors import VectorFileError
from personactl.model.chat_format import EncodedExample
from personactl.steps.monitor import Probe, probe_from_readout, probe_from_vector, project

if TYPE_CHECKING:
    from personactl.model.loading import LoadedModel

VECTOR = "vector"  # `--readout vector`: the projection on the steering vector at the steering layers
TOP = 3  # concepts shown on the readout line


@dataclass
class LiveReadout:
    """What to read each turn: a readout file's probe, or (`probe=None`) the session's steering vector."""

    source: str  # the readout file, or "vector"
    probe: Probe | None

    @classmethod
    def open(cls, spec: str, lm: LoadedModel) -> LiveReadout:
        """`vector`, or a readout file made for a model of this shape; refused on an engine that reads
        no activations in this process (vLLM)."""
        require_reader(getattr(lm, "name", "hf"))
        if spec == VECTOR:
            return cls(VECTOR, None)
        from personactl.store.readout_file import Readout

        readout = Readout.load(Path(spec))
        mine = (readout.metadata.get("hidden_size"), readout.metadata.get("num_layers"))
        if mine != (lm.hidden_size, lm.num_layers):
            raise VectorFileError(
                f"readout made for {readout.metadata.get('model')} (hidden {mine[0]}, {mine[1]} layers) does not "
                f"fit {lm.source.spec} (hidden {lm.hidden_size}, {lm.num_layers} layers)",
                hint="train a readout for this model: personactl readout train",
            )
        return cls(str(spec), probe_from_readout(readout, None, "readout"))

    def read(self, session: Any, prompt: list[int], reply_ids: list[int]) -> dict[str, Any] | None:
        """The turn's projections: `{source, layers, prompt_end: {label: x}, response_avg: {label: x|None}}`
        (None: `vector` on a session steered by a plan alone, which has no vector)."""
        if self.probe is None and session.vector is None:
            return None
        probe = self.probe or probe_from_vector(
            session.vector.vector, session.position, session.aggregator, session.layers, session.vector.label
        )
        example = EncodedExample(tuple(prompt) + tuple(reply_ids), len(prompt))
        result = project(session.lm, probe, [example], tokens=False)
        record: dict[str, Any] = {"source": self.source, "layers": list(probe.rows)}
        for position in ("prompt_end", "response_avg"):
            means = result[position][0].mean(0)  # [K]: the mean over the probe's layers
            record[position] = {
                label: None if math.isnan(x) else round(float(x), 4)
                for label, x in zip(probe.labels, means.tolist(), strict=True)
            }
        return record


def require_reader(backend: str) -> None:
    require_activations(
        backend,
        f"the live readout reads activations in this process; the {backend} backend has none here",
        hint="use --backend hf or mlx for --readout, or run `personactl monitor` on a saved transcript",
    )


def readout_line(record: dict[str, Any]) -> str:
    """One line for the terminal: the top concepts of the reply, or the projection on the vector."""
    from personactl.core.ranges import format_ranges

    layers = f"L{format_ranges(record['layers'])}"
    reply, prompt_end = record["response_avg"], record["prompt_end"]
    if record["source"] == VECTOR:
        (label,) = reply
        shown = "—" if reply[label] is None else f"{reply[label]:+.2f}"
        return f"projection on {label} @{layers}: reply {shown} · prompt end {prompt_end[label]:+.2f}"
    ranked = sorted(reply, key=lambda k: -math.inf if reply[k] is None else reply[k], reverse=True)
    if all(reply[k] is None for k in ranked):  # no reply tokens: rank by the prompt's end instead
        ranked = sorted(prompt_end, key=prompt_end.get, reverse=True)
        return f"readout @{layers} (prompt end): " + " · ".join(f"{k} {prompt_end[k]:+.2f}" for k in ranked[:TOP])
    return f"readout @{layers}: " + " · ".join(f"{k} {reply[k]:+.2f}" for k in ranked[:TOP] if reply[k] is not None)
