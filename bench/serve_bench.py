"""P9: `personactl serve` with 8 concurrent requests of mixed α against the same requests one at a
time (HF engine on this CPU, SmolLM2-135M, greedy, up to 32 tokens each), over loopback HTTP with
the OpenAI client, as a user would send them."""

from __future__ import annotations

import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from timing import REPEATS, interleaved_median_seconds

from personactl.chat.server import ServeDefaults, SteeredEngine, SteeredHTTPServer
from personactl.model.loading import load_model
from personactl.store.traits import load_trait
from personactl.store.vectors import PersonaVector
from personactl.store.workspace import Workspace

ALPHAS = [-3.0, -2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0]
MAX_TOKENS = 32


def random_vector(path: Path, lm, layer: int) -> Path:
    """A vector file with a random direction of norm 4 at every row (steering is what is timed)."""
    vector = torch.randn(lm.num_layers + 1, lm.hidden_size, generator=torch.Generator().manual_seed(0))
    vector = vector / vector.norm(dim=-1, keepdim=True) * 4.0
    metadata = {
        "model": lm.source.spec,
        "model_fingerprint": lm.fingerprint,
        "num_layers": lm.num_layers,
        "hidden_size": lm.hidden_size,
        "rows": list(range(lm.num_layers + 1)),
        "positions": ["response_avg"],
        "aggregators": ["mean_diff"],
        "trait": "bench",
    }
    PersonaVector({"mean_diff.response_avg": vector}, metadata).save(path)
    return path


def bench_serve(results: dict) -> list[tuple]:
    import openai

    lm = load_model("smollm2-135m", log=lambda m: None)  # default dtype (bf16 on CPU)
    questions = load_trait("optimistic").questions.extraction[:8]
    with tempfile.TemporaryDirectory() as tmp:
        path = random_vector(Path(tmp) / "bench.safetensors", lm, 15)
        defaults = ServeDefaults(vector=str(path), layers=[15], alpha=0.0, max_alpha=4.0, max_tokens=MAX_TOKENS)
        engine = SteeredEngine(lm, Workspace(Path(tmp) / "ws"), defaults, max_batch=8)
        server = SteeredHTTPServer(engine, "127.0.0.1", 0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=600)
        counted: dict[str, int] = {}

        def ask(job: tuple[str, float]) -> int:
            question, alpha = job
            reply = client.chat.completions.create(
                model=engine.model_id,
                messages=[{"role": "user", "content": question}],
                max_tokens=MAX_TOKENS,
                temperature=0,
                extra_body={"alpha": alpha},
            )
            return reply.usage.completion_tokens

        jobs = list(zip(questions, ALPHAS, strict=True))

        def concurrent() -> None:
            with ThreadPoolExecutor(len(jobs)) as pool:
                counted["concurrent"] = sum(pool.map(ask, jobs))

        def one_at_a_time() -> None:
            counted["sequential"] = sum(ask(job) for job in jobs)

        try:
            t_concurrent, t_sequential = interleaved_median_seconds(concurrent, one_at_a_time, repeats=REPEATS)
        finally:
            server.shutdown()
            server.server_close()
    tps_concurrent = counted["concurrent"] / t_concurrent
    tps_sequential = counted["sequential"] / t_sequential
    results["serve"] = {
        "requests": len(jobs),
        "max_tokens": MAX_TOKENS,
        "concurrent_seconds": t_concurrent,
        "sequential_seconds": t_sequential,
        "concurrent_tokens": counted["concurrent"],
        "sequential_tokens": counted["sequential"],
    }
    return [
        ("serve: 8 concurrent requests of mixed α vs one at a time, HF (tok/s)", 4.0, tps_concurrent / tps_sequential)
    ]
