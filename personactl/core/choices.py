"""The fixed sets of names the library accepts, written once: the library checks against them and
the command line offers them as choices (this module imports nothing, so `--help` stays fast)."""

from __future__ import annotations

NORM_MODES = ("raw", "unit", "stream")  # what α multiplies: see core.directions.scale_direction
POSITION_MODES = ("all", "prompt", "response")  # which tokens a steering term adds to (model.steering)
STEER_OPS = ("add", "ablate", "cap", "mean-ablate")  # what a steering plan term does (core.steer_plan)
POSITIONS = ("prompt_end", "response_start", "response_avg", "prompt_avg")  # extraction positions
AGGREGATORS = ("mean_diff", "pca", "probe")  # how pairs' differences become one direction
DEFAULT_AGGREGATORS = ("mean_diff", "pca")  # probe reads the pairs a second time: only when asked for
JUDGE_MODES = ("auto", "single", "digits")  # how a remote judge is asked for a score
INDEX_KINDS = ("row", "block")  # how a foreign vector file numbers its layers (store.interop)
PERSONAS = ("model", "user")  # whose turn carries the trait
BACKENDS = ("hf", "vllm", "mlx")  # generation engines (settings.Settings.backend)
DTYPES = ("auto", "bfloat16", "float16", "float32")  # settings.Settings.dtype
EXECUTORS = ("mp", "ray")  # how vLLM starts its ranks (settings.Settings.distributed_executor_backend)
QUANTILE_POINTS = 101  # percentiles 0..100 saved per row by `extract --quantiles` (store.plan_values)
