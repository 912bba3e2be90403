"""Options shared by commands, written once so every command spells them the same way.

An option that takes one of a fixed set is a `str, Enum`, so typer shows the choices and refuses any
other value (a usage error, exit 2). Each set is the library's own list: tests/test_help.py checks
that it equals the tuple its module defines (those modules import torch, which `--help` must not, so
the values are written here rather than imported). Commands hand the library `.value`, a plain str.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from personactl.cli.common import log
from personactl.core import choices

# ---------------------------------------------------------------- choices (the library's lists)


def _choices(name: str, values: tuple[str, ...], doc: str) -> type[Enum]:
    """A `str` Enum of `values` (member name = value): Typer lists and checks them."""
    choice = Enum(name, {value: value for value in values}, type=str)
    choice.__doc__ = doc
    return choice


BackendChoice = _choices("BackendChoice", choices.BACKENDS, "settings.Settings.backend")
DtypeChoice = _choices("DtypeChoice", choices.DTYPES, "settings.Settings.dtype")
NormMode = _choices("NormMode", choices.NORM_MODES, "what α multiplies")
SteerMode = _choices("SteerMode", choices.POSITION_MODES, "which tokens get the vector")
PositionChoice = _choices("PositionChoice", choices.POSITIONS, "the extracted vectors a model-persona file holds")
AggregatorChoice = _choices("AggregatorChoice", choices.AGGREGATORS, "how pair differences become a direction")
JudgeModeChoice = _choices("JudgeModeChoice", choices.JUDGE_MODES, "how a remote judge is asked")
PersonaChoice = _choices("PersonaChoice", choices.PERSONAS, "whose turn carries the trait")
IndexKindChoice = _choices("IndexKindChoice", choices.INDEX_KINDS, "how a foreign file numbers its layers")


def plain(choice: Enum | None) -> str | None:
    """An optional choice as the library takes it: its value, a plain str (None stays None)."""
    return None if choice is None else choice.value


# ---------------------------------------------------------------- where and which model

Workspace = Annotated[
    Optional[Path],
    typer.Option("--workspace", "-w", help="Workspace directory (env PERSONACTL_WORKSPACE).", show_default=False),
]
ConfigFile = Annotated[
    Optional[Path],
    typer.Option(
        "--config", help="personactl.toml to read (default: <workspace>/personactl.toml).", show_default=False
    ),
]
Model = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        help="Built-in name, hub id, local HF dir or .gguf file (default: smollm2-135m).",
        show_default=False,
    ),
]
TraitName = Annotated[str, typer.Option("--trait", "-t", help="Trait name (traits/NAME.yaml) or path to a trait file.")]
Revision = Annotated[
    Optional[str],
    typer.Option("--revision", help="Hub revision (branch, tag or commit) for a hub --model.", show_default=False),
]
Dtype = Annotated[  # a long list of choices: in the help text, so the metavar column stays narrow
    Optional[DtypeChoice],
    typer.Option(
        "--dtype",
        metavar="DTYPE",
        help="auto, bfloat16, float16 or float32 (auto: bfloat16 on CPU/CUDA, float16 on MPS).",
        show_default=False,
    ),
]
Device = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.", show_default=False)]
TrustRemoteCode = Annotated[
    Optional[bool],
    typer.Option(
        "--trust-remote-code", help="Allow model code from the hub (only if you trust it).", show_default=False
    ),
]
Backend = Annotated[
    Optional[BackendChoice],
    typer.Option("--backend", help="Generation engine (default: hf).", show_default=False),
]
ReadingBackend = Annotated[
    Optional[BackendChoice],
    typer.Option(
        "--backend",
        help="Engine that reads the activations (default: hf; with vllm the Hugging Face model reads them: "
        "vLLM's stream lives in its worker processes).",
        show_default=False,
    ),
]
TensorParallelSize = Annotated[
    Optional[int],
    typer.Option(
        "--tensor-parallel-size", min=1, help="vllm backend: GPUs to shard the model over.", show_default=False
    ),
]
PipelineParallelSize = Annotated[
    Optional[int],
    typer.Option(
        "--pipeline-parallel-size",
        min=1,
        help="vllm backend: pipeline stages to split the layers over (GPUs, or nodes with Ray).",
        show_default=False,
    ),
]
ExecutorChoice = _choices("ExecutorChoice", choices.EXECUTORS, "settings.Settings.distributed_executor_backend")
DistributedExecutor = Annotated[
    Optional[ExecutorChoice],
    typer.Option(
        "--distributed-executor-backend",
        help="vllm backend: how ranks start; ray for ranks on several machines (default: vLLM chooses).",
        show_default=False,
    ),
]
DeviceMap = Annotated[
    Optional[str],
    typer.Option(
        "--device-map",
        help="hf backend: spread the blocks over devices with accelerate (auto, balanced, balanced_low_0, "
        "sequential); not with --device.",
        show_default=False,
    ),
]
MaxMemory = Annotated[
    Optional[str],
    typer.Option(
        "--max-memory",
        help="hf backend with --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB.",
        show_default=False,
    ),
]
Persona = Annotated[
    PersonaChoice,
    typer.Option(
        "--persona",
        help="model: the assistant has the trait (I am X); user: the user's turn has it (you are X).",
    ),
]


def layers_option(default: str):
    """`--layers` with the command's own default spelled out (the rows differ by command)."""
    return Annotated[
        Optional[str],
        typer.Option(
            "--layers",
            "-l",
            help=f"Layer rows, e.g. 10,12,14-16 (0 = embeddings, l = output of block l) (default: {default}).",
            show_default=False,
        ),
    ]


Layers = layers_option("every row the file has")
AllLayers = layers_option("all rows, 0..L")
MiddleLayer = layers_option("the middle row, L/2")
EvalLayers = layers_option("about five rows over the middle half")
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout for scripts.")]
Force = Annotated[bool, typer.Option("--force", help="Recompute even if the artifact exists.")]

# ---------------------------------------------------------------- which vector, and how it steers

VectorSpec = Annotated[
    str, typer.Option("--vector", "-v", help="Vector file, or a trait name extracted in the workspace for --model.")
]

SteerPlan = Annotated[
    Optional[list[str]],
    typer.Option(
        "--steer",
        help="A steering-plan term, repeatable, applied in order: VECTOR[@position[/aggregator]]:LAYERS:VALUE[:OP], "
        "OP add (VALUE = α, the default), ablate (c: the projection kept), cap (τ: the most projection kept) or "
        "mean-ablate (× the trait-free mean); e.g. --steer evil:10-14:0:ablate.",
        show_default=False,
    ),
]

VectorPosition = Annotated[  # a long list of choices: in the help text, so the metavar column stays narrow
    PositionChoice,
    typer.Option(
        "--position",
        metavar="POSITION",
        help="Which extracted vector: prompt_end, response_start, response_avg, prompt_avg.",
    ),
]
FileVectorPosition = Annotated[  # any position the file has (a user-persona file has user_avg too)
    str,
    typer.Option("--position", help="Which extracted vector: prompt_end, response_start, response_avg, prompt_avg."),
]
Aggregator = Annotated[AggregatorChoice, typer.Option("--aggregator", help="mean_diff, pca or probe.")]
SteerPositions = Annotated[
    SteerMode,
    typer.Option("--steer-positions", help="Which tokens get the vector (see docs/commands/steer.md)."),
]
OldSteerPositions = Annotated[
    Optional[SteerMode],
    typer.Option("--positions", hidden=True, help="Old name of --steer-positions (deprecated).", show_default=False),
]
Norm = Annotated[
    NormMode, typer.Option("--norm", help="raw (as extracted), unit (norm 1) or stream (layer's mean residual norm).")
]


def steer_positions(mode: SteerMode, old_spelling: SteerMode | None) -> str:
    """The steering mode from `--steer-positions`, or from its old name `--positions` with a note:
    `--positions` now means only extraction positions (in `extract`)."""
    if old_spelling is None:
        return mode.value
    log("note: --positions is deprecated here (it names extraction positions in extract); use --steer-positions")
    return old_spelling.value


# ---------------------------------------------------------------- sampling

MaxNewTokens = Annotated[
    Optional[int],
    typer.Option(
        "--max-new-tokens",
        min=1,
        help="Tokens per response (default: 128, the max_new_tokens setting).",
        show_default=False,
    ),
]
TopP = Annotated[
    Optional[float],
    typer.Option(
        "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass, above 0 (default: 1.0).", show_default=False
    ),
]
BatchSize = Annotated[
    Optional[int],
    typer.Option(
        "--batch-size",
        min=1,
        help="Prompts per batched generate call; lower it if memory runs out (default: 32).",
        show_default=False,
    ),
]
Seed = Annotated[
    Optional[int],
    typer.Option("--seed", help="Sampling seed: same seed and settings, same output (default: 0).", show_default=False),
]

# ---------------------------------------------------------------- the judge (score, eval, run)

JudgeModel = Annotated[
    Optional[str],
    typer.Option(
        "--judge",
        "--judge-model",
        help="Judge model on the endpoint, or local:<model> to judge in process (offline) (default: gpt-4.1-mini).",
        show_default=False,
    ),
]
JudgeMode = Annotated[
    Optional[JudgeModeChoice],
    typer.Option(
        "--judge-mode",
        help="single (one token per number), digits (digit by digit, for Qwen/Llama-2-style tokenizers) "
        "or auto (probe the server) (default: auto).",
        show_default=False,
    ),
]
JudgeBaseUrl = Annotated[
    Optional[str],
    typer.Option(
        "--judge-base-url",
        help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (default: OpenAI).",
        show_default=False,
    ),
]
JudgeConcurrency = Annotated[
    Optional[int],
    typer.Option("--concurrency", min=1, help="Requests in flight (default: 50).", show_default=False),
]
JudgeTimeout = Annotated[
    Optional[float],
    typer.Option("--timeout", min=0.001, help="Seconds per request attempt (default: 60).", show_default=False),
]
JudgeMaxRetries = Annotated[
    Optional[int],
    typer.Option("--max-retries", min=0, help="Retries on 429/5xx/timeouts (default: 4).", show_default=False),
]

# ---------------------------------------------------------------- the eval grid (eval, run)

CellCoherenceThreshold = Annotated[
    Optional[float],
    typer.Option(
        "--coherence-threshold",
        min=0,
        max=100,
        help="Mean coherence a cell needs to count as coherent (default: the trait file's, else 50).",
        show_default=False,
    ),
]
EvalCoefficients = Annotated[
    str, typer.Option("--coefficients", "-c", help="Comma list of α for the grid (0 = the unsteered baseline).")
]
Samples = Annotated[int, typer.Option("--samples", min=1, help="Responses per question and cell.")]
RandomSeeds = Annotated[
    int, typer.Option("--random-seeds", min=0, help="Random directions per random-vector cell (0: no random baseline).")
]
Plots = Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots beside the results.")]
