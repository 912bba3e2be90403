"""Per-pair differences beside a vector file (`extract --keep-pairs`), for bootstrap CIs.

pos − neg of each pair at the vector's rows and positions; their mean over pairs is the vector's
`mean_diff` at those rows. The file and its reader are `store/pair_diffs_file.py` (`load_pair_diffs`
and `save_pair_diffs` are re-exported here). Size:
4 · n_pairs · n_rows · hidden · n_positions bytes (100 pairs × 31 rows × 576 × 4 positions ≈ 29 MB;
a 7B model with 1,000 pairs is ~12 GB: keep fewer layers or positions there).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from personactl.model.chat_format import PairExample
from personactl.model.example_activations import read_examples
from personactl.store.pair_diffs_file import save_pair_diffs

if TYPE_CHECKING:
    from personactl.model.loading import LoadedModel
    from personactl.store.vectors import PersonaVector
    from personactl.store.workspace import Workspace

# load_pair_diffs and save_pair_diffs are re-exported for cli/compare and the tests


def pair_differences(
    lm: LoadedModel, pairs: Sequence[PairExample], rows: Sequence[int], positions: Sequence[str], batch_tokens: int
) -> dict[str, torch.Tensor]:
    """`{position: [n_pairs, n_rows, H]}` pos − neg per pair."""
    examples = [p.pos for p in pairs] + [p.neg for p in pairs]
    readings = read_examples(
        lm.model,
        lm.layers,
        examples,
        pad_id=lm.tokenizer.pad_token_id,
        rows=rows,
        positions=positions,
        batch_tokens=batch_tokens,
    )
    n = len(pairs)
    diffs = readings.values[:n] - readings.values[n:]  # [n, P, R, H]
    return {position: diffs[:, p].contiguous() for p, position in enumerate(positions)}


def keep_pair_diffs(
    workspace: Workspace,
    vector_path: Path,
    lm: LoadedModel,
    vector: PersonaVector,
    pairs: Sequence[PairExample],
    user_pairs: Sequence[PairExample] | None,
    pair_ids: Sequence[str],
    batch_tokens: int,
) -> Path:
    """Write the sidecar of `vector` (every position it has, its rows) and its manifest."""
    rows = vector.rows
    main = [p for p in vector.positions if p != "user_avg"]
    diffs = pair_differences(lm, pairs, rows, main, batch_tokens) if main else {}
    if "user_avg" in vector.positions:
        diffs["user_avg"] = pair_differences(lm, user_pairs, rows, ["response_avg"], batch_tokens)["response_avg"]
    path = workspace.pair_diffs_path(vector_path)
    metadata = {
        "rows": rows,
        "positions": list(diffs),
        "pair_ids": list(pair_ids),
        "n_pairs": len(pairs),
        "vector": vector_path.name,
        "vector_created": vector.metadata.get("created"),
        "model": vector.metadata.get("model"),
        "trait": vector.metadata.get("trait"),
        "persona": vector.metadata.get("persona"),
        "layer_convention": vector.metadata.get("layer_convention"),
    }
    save_pair_diffs(path, diffs, metadata)
    workspace.write_manifest(path, "pair_diffs", metadata=metadata, bytes=path.stat().st_size)
    return path
