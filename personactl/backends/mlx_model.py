"""An MLX model as personactl sees it: loaded with mlx-lm from the same files the other engines read
(built-in models from their converted checkpoint), with the Hugging Face tokenizer and generation
config, so prompts, stop tokens and vector files are the same on every engine.

MLX has no hooks. Decoder blocks are wrapped for as long as a reading or a steering lasts
(`wrapped_blocks`): the wrapper calls the block, then hands its output on; the model's own list of
blocks is restored in `finally`. Layer convention as everywhere: row 0 is the input of block 1 (the
embeddings), row l the output of block l."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from personactl.errors import InputError, ModelError

if TYPE_CHECKING:
    from personactl.model.activations import Batch

MLX_HINT = "use --backend hf (it loads .gguf files and every transformers architecture)"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def import_mlx() -> Any:
    """`mlx.core`, or a ModelError saying how to install it."""
    try:
        import mlx.core as mx
        import mlx_lm  # noqa: F401 - checked here, used by the loader
    except ImportError as exc:
        raise ModelError(
            f"the mlx backend needs MLX and mlx-lm ({exc})",
            hint="pip install 'personactl[mlx]' (on Linux it installs MLX's CPU build)",
        ) from None
    return mx


def mx_to_torch(array: Any, dtype: torch.dtype) -> torch.Tensor:
    """An MLX array as a torch tensor of `dtype` (through float32: exact for bf16 and fp16 values)."""
    import mlx.core as mx
    import numpy as np

    return torch.from_numpy(np.array(array.astype(mx.float32), copy=True)).to(dtype)


def torch_to_mx(tensor: torch.Tensor, dtype: Any) -> Any:
    """A torch tensor as an MLX array of `dtype` (through float32: exact for bf16 and fp16 values)."""
    import mlx.core as mx

    return mx.array(tensor.detach().to("cpu", torch.float32).numpy()).astype(dtype)


class _Wrapped:
    """A decoder block with something run on its input (`before`) and its output (`after`); every
    other attribute is the block's own (models read e.g. `layer.use_sliding` in their loop)."""

    def __init__(self, block: Any, before: Callable[[Any], None] | None, after: Callable[[Any], Any] | None):
        self.block, self.before, self.after = block, before, after

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        if self.before is not None:
            self.before(x)
        out = self.block(x, *args, **kwargs)
        return self.after(out) if self.after is not None else out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.block, name)


@contextlib.contextmanager
def wrapped_blocks(
    blocks: list[Any],
    after: Mapping[int, Callable[[Any], Any]],
    before: Mapping[int, Callable[[Any], None]] | None = None,
) -> Iterator[None]:
    """Blocks `i` (0-based) wrapped with `before[i]` / `after[i]` while inside; restored on exit."""
    before = before or {}
    originals = {i: blocks[i] for i in sorted({*after, *before})}
    try:
        for i, block in originals.items():
            blocks[i] = _Wrapped(block, before.get(i), after.get(i))
        yield
    finally:
        for i, block in originals.items():
            blocks[i] = block


def decoder_blocks(net: Any) -> list[Any]:
    """The list of decoder blocks the model's forward pass walks at every call: wrapping its entries
    steers and reads. mlx-lm models expose `layers` either as that list or as a fresh slice of the
    inner model's list at each call (Qwen2's pipeline layers): wrapping a slice would change nothing."""
    exposed = net.layers
    inner = getattr(getattr(net, "model", None), "layers", None)
    same = isinstance(inner, list) and len(inner) == len(exposed)
    if same and all(a is b for a, b in zip(inner, exposed, strict=True)):
        return inner
    if exposed is net.layers and isinstance(exposed, list):
        return exposed
    raise InputError("cannot find the MLX model's own list of decoder blocks", hint=MLX_HINT)


def check_padded_batches(net: Any) -> None:
    """Refuse a model whose mlx-lm implementation does not mask a left-padded batch row by row (Gemma
    2's attention applies the batch cache's mask per KV head instead): a padded row must give the
    logits it gives alone. Two short prompts, once, at load."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    long, short = [5, 6, 7, 8, 9, 10], [5, 6, 7]
    blocks = len(decoder_blocks(net))
    try:
        both = net(mx.array([long, [0, 0, 0, *short]]), cache=[BatchKVCache([0, 3]) for _ in range(blocks)])
        alone = net(mx.array([short]), cache=[BatchKVCache([0]) for _ in range(blocks)])
        gap = mx.abs(both[1, -1].astype(mx.float32) - alone[0, -1].astype(mx.float32)).max()
        scale = mx.abs(alone[0, -1].astype(mx.float32)).max()
        wrong = float(gap) > 1e-2 * float(scale) + 1e-6
    except Exception:  # noqa: BLE001 - a mask the model cannot even broadcast: the same verdict
        wrong = True
    if wrong:
        raise InputError(
            "mlx-lm's implementation of this model does not mask padded rows of a batch one by one",
            hint=MLX_HINT,
        )


class _StopForward(Exception):
    """Raised after the deepest row read: the rest of the model does not run."""


class MLXRows:
    """The MLX model as a `personactl.model.row_reader.RowReader`: extraction, monitoring and
    readouts read its residual rows as they read a torch model's."""

    device = torch.device("cpu")  # the torch tensors handed over live on the CPU (unified memory on a Mac)

    def __init__(self, net: Any, blocks: list[Any], hidden_size: int, dtype: torch.dtype):
        self.net, self.blocks, self.hidden_size, self.dtype = net, blocks, hidden_size, dtype

    def read_rows(self, batch: Batch, rows: Sequence[int], on_row: Callable[[int, torch.Tensor], None]) -> None:
        """One forward pass: the batch's padding is given to mlx-lm's batch cache, which masks it and
        starts each row's positions at its first real token (either padding side)."""
        import mlx.core as mx
        from mlx_lm.models.cache import BatchKVCache

        deepest, handed = max(rows), []

        def hand_over(row: int) -> Callable[[Any], Any]:
            def take(hidden: Any) -> Any:
                on_row(row, mx_to_torch(hidden, self.dtype))
                handed.append(row)
                if row == deepest:
                    raise _StopForward
                return hidden

            return take

        before = {0: hand_over(0)} if 0 in rows else {}
        after = {row - 1: hand_over(row) for row in rows if row > 0}
        ids = mx.array(batch.input_ids.cpu().numpy())
        cache = [BatchKVCache(batch.first.cpu().tolist()) for _ in self.blocks]
        with wrapped_blocks(self.blocks, after, before):
            try:
                mx.eval(self.net(ids, cache=cache))
            except _StopForward:
                pass
        if sorted(handed) != sorted(rows):  # a model whose forward pass does not run these blocks
            raise ModelError(f"the MLX model ran without handing over rows {sorted(set(rows) - set(handed))}")


def model_directory(source: Any, cache_dir: Path, revision: str | None, token: str | None, log: Any) -> Path:
    """The directory mlx-lm reads: the converted built-in checkpoint, a local directory or a hub
    snapshot; a .gguf file is refused (mlx-lm reads safetensors checkpoints)."""
    from personactl.model.loading import ensure_builtin

    if source.kind == "builtin":
        return ensure_builtin(source.spec, cache_dir, log)
    if source.kind == "gguf":
        raise InputError(f"the mlx backend does not load .gguf files ({source.spec})", hint=MLX_HINT)
    if source.kind == "local":
        return Path(source.location)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.location, revision=revision, token=token))
    except Exception as exc:  # noqa: BLE001 - the hub's errors (offline, unknown id) all mean "not here"
        raise ModelError(
            f"cannot fetch {source.spec!r} for mlx: {str(exc).splitlines()[0][:200]}",
            hint="check the id and your network (or HF_HUB_OFFLINE); or pass a local directory",
        ) from None


def mlx_config_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """What mlx-lm misses in a config saved by transformers ≥ 5: rope settings moved under
    `rope_parameters`, where mlx-lm does not look (it then rotates with θ = 10000, and every position
    after the first few is wrong). Lifted back to the top level; settings per layer type are refused."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" in config:
        return {}
    if any(isinstance(value, dict) for value in rope.values()):  # per layer type (Gemma 3): no mlx-lm key
        raise InputError("mlx-lm cannot read this config's per-layer-type rope_parameters", hint=MLX_HINT)
    overrides: dict[str, Any] = {}
    if "rope_theta" in rope:
        overrides["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default" and "rope_scaling" not in config:
        overrides["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return overrides


def load_mlx_net(directory: Path, dtype: str, trust_remote_code: bool) -> Any:
    """The mlx-lm model in `dtype` (a float dtype's name); a refusal naming the HF engine where
    mlx-lm lacks the architecture or cannot build it from the config."""
    mx = import_mlx()
    from mlx_lm.utils import load_model

    config = json.loads((directory / "config.json").read_text())
    try:
        net, _ = load_model(directory, model_config=mlx_config_overrides(config), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - the model's files and mlx-lm's code: any failure is "cannot load"
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"mlx-lm cannot load {directory.name}: {reason}", hint=MLX_HINT) from None
    net.set_dtype(getattr(mx, dtype))
    mx.eval(held_arrays(net))
    return net


def held_arrays(net: Any) -> list[Any]:
    """Every array the model holds: its parameters and its private ones (Llama 3's RoPE keeps its
    frequencies as `_freqs`, computed lazily at construction). Evaluated on the loading thread, since
    MLX streams belong to a thread: serve and chat generate on worker threads, where a lazy array
    made here fails with "There is no Stream(cpu, 0) in current thread"."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    return [value for _, value in tree_flatten(net) if isinstance(value, mx.array)]


def net_dtype(net: Any) -> torch.dtype:
    """The torch dtype of the model's first floating-point parameters (what its stream is computed
    in; a quantized model's packed integer weights are not)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    floats = (v for _, v in tree_flatten(net.parameters()) if mx.issubdtype(v.dtype, mx.floating))
    first = next(floats, None)
    name = str(first.dtype).rsplit(".", 1)[-1] if first is not None else "none"
    if name not in TORCH_DTYPES:
        raise ModelError(f"the MLX model computes in {name}", hint="use --backend hf")
    return TORCH_DTYPES[name]
