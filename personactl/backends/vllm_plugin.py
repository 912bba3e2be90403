"""Steering buffers on vLLM's decoder layers, installed before vLLM compiles the model.

vLLM traces its model once; a forward hook added afterwards (`llm.apply_model`) is silently left
out of the compiled graph. So `register`, the `vllm.general_plugins` entry point that vLLM calls in
every process, wraps the model loader: right after an engine's weights are loaded, and only for an
engine created with `additional_config={"personactl_steering": True}`, every decoder layer gets a
zero `[hidden]` buffer and a forward hook that adds it to the layer's output. The compiled graph
reads the buffer, so `set_steering` changes the steering by `copy_` without recompiling. The flag
is part of vLLM's compile-cache key, so a graph compiled without the hooks is never reused for an
engine that needs them (and the other way round). Engines without the flag are left untouched.

This module is imported in vLLM's worker processes and must not import personactl's heavy modules.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

FLAG = "personactl_steering"  # the additional_config key that asks for steering buffers
BUFFER = "personactl_steering"  # the buffer's name on each decoder layer


def register() -> None:
    """vLLM plugin entry point: wrap the model loader once per process."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    original = BaseModelLoader.load_model
    if getattr(original, "_personactl_wrapped", False):
        return

    @functools.wraps(original)
    def load_model(self: Any, vllm_config: Any, model_config: Any, *args: Any, **kwargs: Any) -> Any:
        model = original(self, vllm_config, model_config, *args, **kwargs)
        # the engine's own model only (a speculative-decoding drafter has its own model_config)
        if wants_steering(vllm_config) and model_config is vllm_config.model_config:
            install(model, text_config(model_config.hf_config), model_config.dtype)
        return model

    load_model._personactl_wrapped = True  # type: ignore[attr-defined]
    BaseModelLoader.load_model = load_model


def wants_steering(vllm_config: Any) -> bool:
    extra = getattr(vllm_config, "additional_config", None)
    return isinstance(extra, Mapping) and bool(extra.get(FLAG))


def text_config(hf_config: Any) -> Any:
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


def decoder_layers(model: Any, num_layers: int) -> Any:
    """The decoder blocks: `model.model.layers` for most vLLM models, else the first block list of
    the configured length (multimodal wrappers nest the language model one level deeper)."""
    import torch.nn as nn

    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) == num_layers:
        return layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise RuntimeError(f"personactl: cannot find the {num_layers} decoder layers of {type(model).__name__}")


def _add_steering(module: Any, _args: Any, output: Any) -> Any:
    """Add the layer's buffer to its output. vLLM decoder layers return `(hidden, residual)` and the
    residual stream is their sum, so adding to `hidden` adds to the stream."""
    if isinstance(output, tuple):
        return (output[0] + getattr(module, BUFFER), *output[1:])
    return output + getattr(module, BUFFER)


def install(model: Any, config: Any = None, dtype: Any = None) -> int:
    """Give every decoder layer a zero steering buffer and the hook that adds it. Idempotent.

    Returns the number of layers. Called by the loader wrapper (compiled engines) or through
    `llm.apply_model` on an `enforce_eager=True` engine, where hooks added late still act."""
    import torch

    config = text_config(config if config is not None else model.config)
    layers = decoder_layers(model, config.num_hidden_layers)
    param = next(p for p in model.parameters() if p.is_floating_point())  # not a quantized weight
    dtype = dtype or param.dtype
    for layer in layers:
        if BUFFER in layer._buffers:
            continue
        layer.register_buffer(BUFFER, torch.zeros(config.hidden_size, dtype=dtype, device=param.device), False)
        layer.register_forward_hook(_add_steering)
    return len(layers)


def installed_layers(model: Any) -> int:
    """How many modules carry a steering buffer (0: the plugin did not run for this engine)."""
    return sum(1 for module in model.modules() if BUFFER in module._buffers)


def set_steering(model: Any, deltas: Mapping[int, Any]) -> int:
    """Set what each decoder layer adds, in place: `deltas[l]` (a `[hidden]` tensor) goes to the
    output of block `l` (1-based, personactl's layer convention); every other layer adds zero.
    Run in each worker through `llm.apply_model(functools.partial(set_steering, deltas=...))`."""
    blocks = [module for module in model.modules() if BUFFER in module._buffers]
    if not blocks:
        raise RuntimeError("personactl: this vLLM engine has no steering buffers")
    for index, block in enumerate(blocks, start=1):
        buffer = block._buffers[BUFFER]
        delta = deltas.get(index)
        if delta is None:
            buffer.zero_()
        else:
            buffer.copy_(delta.to(device=buffer.device, dtype=buffer.dtype))
    return len(blocks)
