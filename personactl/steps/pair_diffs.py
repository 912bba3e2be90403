"""Per-pair differences beside a vector file (`extract --keep-pairs`), for bootstrap CIs.

`pair-diffs-<persona>.safetensors` holds `diff.<position>` `[n_pairs, n_rows, hidden]` fp32
(pos − neg of each pair, only the extracted rows, in `rows` order) and metadata naming the pairs,
rows and positions. Its mean over pairs is the vector's `mean_diff` at those rows. Size:
4 · n_pairs · n_rows · hidden · n_positions bytes (100 pairs × 31 rows × 576 × 4 positions ≈ 29 MB;
a 7B model with 1,000 pairs is ~12 GB: keep fewer layers or positions there).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personactl.errors import VectorFileError
from personactl.model.chat_format import PairExample
from personactl.model.example_activations import read_examples

if TYPE_CHECKING:
    from personactl.model.loading import LoadedModel
    from personactl.store.workspace import Workspace

FORMAT = "personactl.pair_diffs/1"
KEEP_PAIRS = "remake it: personactl extract ... --keep-pairs --force"


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
    vector: Any,
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


def save_pair_diffs(path: Path, diffs: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from personactl.store.workspace import atomic_path

    tensors = {f"diff.{pos}": t.float().contiguous() for pos, t in diffs.items()}
    meta = {k: json.dumps(v) for k, v in {"format": FORMAT, **metadata}.items()}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_pair_diffs(path: Path, position: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """`[n_pairs, n_rows, H]` at `position`, and the metadata (`rows`, `pair_ids`, …)."""
    from safetensors import safe_open

    from personactl.store.tagged_file import decoded_metadata, reading

    if not Path(path).is_file():
        raise VectorFileError(
            f"no per-pair differences at {path}",
            hint="extract with --keep-pairs to get confidence intervals and split-half reliability",
        )
    with reading(path, hint=KEEP_PAIRS), safe_open(str(path), framework="pt") as f:
        metadata = decoded_metadata(f.metadata())
        key = f"diff.{position}"
        if metadata.get("format") != FORMAT or key not in f.keys():
            raise VectorFileError(f"{path} has no per-pair differences at {position}", hint=KEEP_PAIRS)
        diffs = f.get_tensor(key)
    rows = metadata.get("rows")
    if diffs.ndim != 3 or not isinstance(rows, list) or diffs.shape[1] != len(rows):
        raise VectorFileError(
            f"{path}: {key} has shape {list(diffs.shape)}, not [pairs, {len(rows or [])} rows, hidden]",
            hint=KEEP_PAIRS,
        )
    return diffs, metadata
