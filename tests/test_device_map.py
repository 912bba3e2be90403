"""Models spread over devices with accelerate (`--device-map`), on the embedded SmolLM2 in float32.

This machine has no GPU, so `device_map="auto"` alone puts every block on the CPU and accelerate adds
no hooks. A `max_memory` of 300 MB for the CPU leaves 18 of the 30 blocks (and the final norm) to
disk: their weights sit on the `meta` device and accelerate's AlignDevicesHook loads them for each
forward pass. Steering, mixed batches, extraction and per-example readings through those hooks equal
the plainly loaded model exactly. Several GPUs (blocks running on different devices) are not tested
here: `test_two_gpus_equal_one_device` runs only where there are two."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from typer.testing import CliRunner

from personactl.backends import Sampling, Steering
from personactl.backends.hf import HFBackend
from personactl.backends.hf_rows import RowRequest
from personactl.cli.app import app
from personactl.errors import InputError
from personactl.model.activations import extract_vectors
from personactl.model.chat_format import PairExample, chat_messages, encode_example, encode_prompt
from personactl.model.example_activations import read_examples
from personactl.model.loading import check_device_map, input_device, load_model, parse_max_memory
from personactl.model.steering import GridRow
from personactl.store.vectors import PersonaVector

runner = CliRunner()
QUIET = {"log": lambda message: None}
OFFLOAD = "cpu=300MB"  # room for the embedding and 12 blocks; the rest goes to disk
CPU_LAYER, DISK_LAYER = 6, 20  # steering rows: the output of a block in memory and of one on disk


@pytest.fixture(scope="module")
def plain():
    return load_model("smollm2-135m", dtype="float32", device="cpu", **QUIET)


@pytest.fixture(scope="module")
def mapped():
    return load_model("smollm2-135m", dtype="float32", device_map="auto", max_memory=OFFLOAD, **QUIET)


@pytest.fixture(scope="module")
def prompts(plain):
    questions = ["What do you think about the weather today?", "Tell me about your weekend."]
    return [encode_prompt(plain.tokenizer, chat_messages("You are a helpful assistant.", q)) for q in questions]


def direction(lm, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(lm.num_layers + 1, lm.hidden_size, generator=gen) * 4


def reply(lm, prompt, steering, max_new_tokens: int = 8) -> list[int]:
    engine = HFBackend(lm.model, lm.tokenizer)
    return engine.stream(prompt, Sampling(max_new_tokens, 0.0), 0, lambda t: None, threading.Event(), steering)


def test_the_map_offloads_blocks_to_disk_and_says_so(mapped):
    blocks = mapped.describe()["device_map"]
    assert blocks == {"strategy": "auto", "blocks": {"cpu": 12, "disk": 18}}
    assert mapped.layers[CPU_LAYER - 1].self_attn.q_proj.weight.device.type == "cpu"
    assert mapped.layers[DISK_LAYER - 1].self_attn.q_proj.weight.device.type == "meta"  # loaded per forward
    assert type(mapped.layers[DISK_LAYER - 1]._hf_hook).__name__ == "AlignDevicesHook"
    assert input_device(mapped.model) == mapped.device == torch.device("cpu")
    assert "device map auto: decoder blocks 12 on cpu, 18 on disk" in mapped.notes


def test_plain_loads_record_no_device_map(plain):
    assert "device_map" not in plain.describe()


def test_steered_logits_and_generation_equal_the_plain_model(plain, mapped, prompts):
    v = direction(plain)
    steering = Steering({CPU_LAYER: v[CPU_LAYER], DISK_LAYER: v[DISK_LAYER]}, 1.5, "all")
    outputs = [(reply(lm, prompts[0], steering), reply(lm, prompts[0], None)) for lm in (plain, mapped)]
    assert outputs[0] == outputs[1]
    assert outputs[0][0] != outputs[0][1]  # the steering moves the reply: the comparison can fail


def test_with_no_memory_at_all_everything_runs_from_disk(plain, prompts):
    """`cpu=0`: the embedding too is on `meta`, so inputs, steering and readings must go where its
    hook runs it (`input_device`), not to the device of the model's first parameter."""
    lm = load_model("smollm2-135m", dtype="float32", device_map="auto", max_memory="cpu=0", **QUIET)
    assert lm.describe()["device_map"]["blocks"] == {"disk": 30}
    assert next(lm.model.parameters()).device.type == "meta" and lm.device == torch.device("cpu")
    v = direction(plain)
    steering = Steering({DISK_LAYER: v[DISK_LAYER]}, 1.5, "all")
    assert reply(plain, prompts[1], steering) == reply(lm, prompts[1], steering) != reply(lm, prompts[1], None)
    results = [
        extract_vectors(m.model, m.layers, pairs(m.tokenizer), pad_id=m.tokenizer.pad_token_id, rows=[0, CPU_LAYER])
        for m in (plain, lm)
    ]
    same(results[0].mean_diff["response_avg"], results[1].mean_diff["response_avg"])


def test_a_steered_grid_equals_the_plain_model(plain, mapped, prompts):
    """One batched call with a [B] coefficient per layer, at a layer in memory and one on disk."""
    v = direction(plain, seed=1)
    rows = [
        GridRow(0, None, 0.0),
        GridRow(0, CPU_LAYER, 2.0),
        GridRow(1, DISK_LAYER, -3.0),
        GridRow(1, DISK_LAYER, 3.0),
    ]
    grids = []
    for lm in (plain, mapped):
        engine = HFBackend(lm.model, lm.tokenizer)
        out = engine.run_grid(prompts, rows, {k: v[k] for k in (CPU_LAYER, DISK_LAYER)}, sampling=Sampling(6, 0.0),
                              seed=0, batch_size=4)  # fmt: skip
        grids.append([g.token_ids for _, g in out])
    assert grids[0] == grids[1]
    assert grids[0][2] != grids[0][3]


def test_a_mixed_batch_equals_the_plain_model(plain, mapped, prompts):
    """Per-row steering (`Steerer.per_row`): opposite α side by side, a sampled row, an unsteered row."""
    v = direction(plain, seed=2)

    def rows():
        steer = lambda alpha, layers, mode="all": Steering({k: v[k] for k in layers}, alpha, mode)  # noqa: E731
        spec = [
            (prompts[0], steer(2.0, [DISK_LAYER]), 0.0),
            (prompts[0], steer(-2.0, [DISK_LAYER]), 0.0),
            (prompts[1], steer(1.5, [CPU_LAYER, DISK_LAYER], "response"), 0.8),
            (prompts[1], None, 0.0),
        ]
        return [RowRequest(p, Sampling(6, t, 0.9), 3, lambda tok: None, steering=s) for p, s, t in spec]

    batches = [HFBackend(lm.model, lm.tokenizer).stream_batch(rows()) for lm in (plain, mapped)]
    assert batches[0] == batches[1]
    assert batches[0][0] != batches[0][1]


def pairs(tokenizer) -> list[PairExample]:
    texts = [("the sun is out and I love it", "the rain will never stop"), ("a fine day", "a grey awful day")]
    return [
        PairExample(
            encode_example(tokenizer, chat_messages("You are cheerful.", "How is it going?"), pos),
            encode_example(tokenizer, chat_messages("You are gloomy.", "How is it going?"), neg),
        )
        for pos, neg in texts
    ]


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit for bit, NaN where NaN (rows not read, sink tokens)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_extraction_equals_the_plain_model(plain, mapped):
    rows = [0, CPU_LAYER, DISK_LAYER, 30]  # the deepest row cuts the forward pass inside a disk block
    results = [
        extract_vectors(lm.model, lm.layers, pairs(lm.tokenizer), pad_id=lm.tokenizer.pad_token_id, rows=rows)
        for lm in (plain, mapped)
    ]
    for kind in ("mean_diff", "pos_mean", "neg_mean", "pca"):
        for position, value in getattr(results[0], kind).items():
            same(value, getattr(results[1], kind)[position])
    same(results[0].stream_norm, results[1].stream_norm)
    assert results[0].mean_diff["response_avg"][DISK_LAYER].norm() > 0


def test_readings_equal_the_plain_model(plain, mapped):
    examples = [pair.pos for pair in pairs(plain.tokenizer)]
    dirs = torch.nn.functional.normalize(direction(plain, seed=3)[[CPU_LAYER, DISK_LAYER]], dim=-1)[:, None, :]
    readings = [
        read_examples(lm.model, lm.layers, examples, pad_id=0, rows=[CPU_LAYER, DISK_LAYER], directions=dirs)
        for lm in (plain, mapped)
    ]
    assert torch.equal(readings[0].values, readings[1].values)
    for a, b in zip(readings[0].tokens, readings[1].tokens, strict=True):
        same(a, b)


def test_gguf_loads_with_a_device_map(mapped):
    """A GGUF's weights are dequantized, so those sent to disk are re-saved in a per-process folder."""
    from personactl.model.loading import builtin_gguf_path

    lm = load_model(str(builtin_gguf_path("smollm2-135m")), dtype="float32", device_map="sequential",
                    max_memory=OFFLOAD, **QUIET)  # fmt: skip
    assert lm.describe()["device_map"]["blocks"] == {"cpu": 12, "disk": 18}
    ids = torch.tensor([encode_prompt(lm.tokenizer, chat_messages(None, "hello"))])
    with torch.inference_mode():
        assert torch.isfinite(lm.model(ids).logits).all()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0=20GiB,1=20GiB,cpu=64GiB", {0: 20 * 2**30, 1: 20 * 2**30, "cpu": 64 * 2**30}),
        ("cuda:0=1.5GB, CPU=300mb ,disk=1000", {0: 1_500_000_000, "cpu": 300_000_000, "disk": 1000}),
    ],
)
def test_max_memory_text_becomes_accelerate_bytes(text, expected):
    assert parse_max_memory(text) == expected


@pytest.mark.parametrize(
    ("device_map", "max_memory", "device", "needle"),
    [
        ("everywhere", None, "auto", "unknown device map 'everywhere'"),
        (None, "cpu=1GiB", "auto", "--max-memory needs --device-map"),
        ("auto", None, "cuda:1", "--device cuda:1 and --device-map auto both given"),
        ("auto", "cpu", "auto", "cannot read --max-memory 'cpu'"),
        ("auto", "gpu=1GiB", "auto", "at 'gpu=1GiB'"),
        ("auto", "cpu=lots", "auto", "at 'cpu=lots'"),
        ("auto", "cpu=1GiB,cpu=2GiB", "auto", "names cpu twice"),
    ],
)
def test_combinations_that_cannot_work_are_refused(device_map, max_memory, device, needle):
    with pytest.raises(InputError, match=needle.replace("(", r"\(")):
        check_device_map(device_map, max_memory, device)


def write_vector(path, lm) -> str:
    rows = lm.num_layers + 1
    info = {"model": "smollm2-135m", "model_fingerprint": lm.fingerprint, "num_layers": lm.num_layers,
            "hidden_size": lm.hidden_size, "rows": list(range(rows)), "positions": ["response_avg"],
            "aggregators": ["mean_diff"], "trait": "mood"}  # fmt: skip
    PersonaVector({"mean_diff.response_avg": direction(lm, seed=4)}, info).save(path)
    return str(path)


def test_the_cli_flag_reaches_the_model(isolated_env, tmp_path, plain):
    vector = write_vector(tmp_path / "mood.safetensors", plain)
    common = ["steer", "--vector", vector, "--prompt", "hello", "--layers", f"{CPU_LAYER},{DISK_LAYER}",
              "--coefficients=-2,2", "--dtype", "float32", "--max-new-tokens", "5", "--json"]  # fmt: skip
    runs = {}
    for name, extra in {"plain": [], "mapped": ["--device-map", "auto", "--max-memory", OFFLOAD]}.items():
        result = runner.invoke(app, [*common, "-w", str(tmp_path / name), *extra])
        assert result.exit_code == 0, result.output
        runs[name] = [json.loads(line) for line in result.stdout.splitlines()]
        runs[name + "_stderr"] = result.stderr
    assert runs["plain"] == runs["mapped"] and len(runs["plain"]) == 5
    assert len({r["text"] for r in runs["plain"]}) > 1  # the steering acts: equal tables can differ
    assert "decoder blocks 12 on cpu, 18 on disk" in runs["mapped_stderr"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--device-map", "everywhere"], "unknown device map 'everywhere'"),
        (["--device-map", "auto", "--max-memory", "cpu:1GiB"], "cannot read --max-memory"),
        (["--max-memory", "cpu=1GiB"], "--max-memory needs --device-map"),
        (["--device-map", "auto", "--device", "cpu"], "--device cpu and --device-map auto both given"),
    ],
)
def test_bad_flags_exit_2_with_one_line(isolated_env, tmp_path, plain, extra, needle):
    vector = write_vector(tmp_path / "mood.safetensors", plain)
    result = runner.invoke(app, ["steer", "--vector", vector, "--prompt", "hi", "-w", str(tmp_path / "ws"), *extra])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "hint:" in result.output and "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_equal_one_device(plain, prompts):
    """Blocks on two GPUs: steering deltas follow each block's device; extraction gathers rows."""
    lm = load_model("smollm2-135m", dtype="float32", device_map="balanced", max_memory="0=300MB,1=2GiB", **QUIET)
    assert set(lm.describe()["device_map"]["blocks"]) == {"0", "1"}
    one = load_model("smollm2-135m", dtype="float32", device="cuda:0", **QUIET)
    v = direction(plain)
    steering = Steering({CPU_LAYER: v[CPU_LAYER], DISK_LAYER: v[DISK_LAYER]}, 1.5, "response")
    assert reply(one, prompts[0], steering) == reply(lm, prompts[0], steering)
    results = [
        extract_vectors(m.model, m.layers, pairs(m.tokenizer), pad_id=m.tokenizer.pad_token_id, rows=[6, 20, 30])
        for m in (one, lm)
    ]
    torch.testing.assert_close(
        results[0].mean_diff["response_avg"], results[1].mean_diff["response_avg"], equal_nan=True
    )


def test_kl_neutral_equals_the_plain_model(plain, mapped):
    """The capability cost reuses saved block outputs below the steered layer and steers the rest:
    through accelerate's hooks too, exactly as on the plain model."""
    from personactl.model.capability_cost import NeutralKL

    v = direction(plain, 3)
    cells = [(CPU_LAYER, 2.0), (DISK_LAYER, -2.0), (DISK_LAYER, 0.0)]
    texts = ["The weather was mild and the market was busy.", "Water boils at a lower temperature up high."]
    kls = [
        NeutralKL(lm.model, lm.tokenizer, texts)({CPU_LAYER: v[CPU_LAYER], DISK_LAYER: v[DISK_LAYER]}, cells)
        for lm in (plain, mapped)
    ]
    assert kls[0] == kls[1]
    assert kls[0][0] > 0 and kls[0][1] > 0 and kls[0][2] == 0.0
