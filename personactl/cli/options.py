"""Options shared by commands, written once so every command spells them the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

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
Dtype = Annotated[
    Optional[str], typer.Option("--dtype", help="auto, bfloat16, float16 or float32.", show_default=False)
]
Device = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.", show_default=False)]
TrustRemoteCode = Annotated[
    Optional[bool],
    typer.Option(
        "--trust-remote-code", help="Allow model code from the hub (only if you trust it).", show_default=False
    ),
]
Backend = Annotated[
    Optional[str],
    typer.Option("--backend", help="Generation engine: hf or vllm (default: hf).", show_default=False),
]
TensorParallelSize = Annotated[
    Optional[int],
    typer.Option(
        "--tensor-parallel-size", min=1, help="vllm backend: GPUs to shard the model over.", show_default=False
    ),
]
VectorPosition = Annotated[
    str,
    typer.Option("--position", help="Which extracted vector: prompt_end, response_start, response_avg, prompt_avg."),
]
Aggregator = Annotated[str, typer.Option("--aggregator", help="mean_diff or pca.")]
SteerPositions = Annotated[
    str, typer.Option("--positions", help="Where to add: all, prompt or response (see docs/commands/steer.md).")
]
Norm = Annotated[
    str, typer.Option("--norm", help="raw (as extracted), unit (norm 1) or stream (layer's mean residual norm).")
]
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
