"""One settings object for every command.

Precedence, highest first: CLI flags > environment (`PERSONACTL_*`) > `personactl.toml`
(`--config PATH`, else `<workspace>/personactl.toml`) > defaults. `load_settings` also reports
where each value came from, for `personactl config`.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from personactl.errors import ConfigError

ENV_PREFIX = "PERSONACTL_"
CONFIG_FILENAME = "personactl.toml"
DEFAULT_WORKSPACE = Path("personactl-workspace")

_toml_file: ContextVar[Path | None] = ContextVar("personactl_toml_file", default=None)


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "personactl"


class Settings(BaseSettings):
    """Every tunable of personactl. Field names are the TOML keys; env vars are PERSONACTL_<NAME>."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    workspace: Path = Field(DEFAULT_WORKSPACE, description="directory holding every artifact")
    model: str = Field("smollm2-135m", description="built-in name, hub id, local HF dir or .gguf file")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="model dtype; auto = bfloat16 on CPU/CUDA, float16 on MPS"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    device_map: str | None = Field(
        None,
        description="hf backend: spread the model's blocks over devices with accelerate (auto, balanced, "
        "balanced_low_0, sequential); not with device",
    )
    max_memory: str | None = Field(
        None, description="hf backend with device_map: memory per device, e.g. '0=20GiB,1=20GiB,cpu=64GiB'"
    )
    trust_remote_code: bool = Field(False, description="run model code from the hub (opt-in only)")
    cache_dir: Path = Field(default_factory=_default_cache_dir, description="converted built-in models")
    hf_token: SecretStr | None = Field(None, description="token for gated hub models (never written)")
    backend: Literal["hf", "vllm", "mlx"] = Field(
        "hf", description="generation engine: hf (transformers), vllm, or mlx (Apple silicon; MLX's CPU build on Linux)"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm backend: GPUs to shard the model over")
    pipeline_parallel_size: int = Field(
        1, ge=1, description="vllm backend: pipeline stages (GPUs or nodes) to split the layers over"
    )
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None, description="vllm backend: how ranks start (ray: across machines); default: vLLM chooses"
    )
    vllm_plan_projections: int = Field(
        2, ge=0, le=8, description="vllm backend: ablate/cap slots per layer for steering plans (0: add-only tables)"
    )
    vllm_eager: bool = Field(
        False, description="vllm backend: skip compilation (starts in about half the time on a CPU; decodes slower)"
    )

    batch_size: int = Field(32, ge=1, description="generation batch size")
    max_new_tokens: int = Field(128, ge=1, description="tokens generated per response")
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    samples_per_question: int = Field(1, ge=1, description="responses per (instruction, question)")
    seed: int = Field(0, description="sampling seed; same seed, same rows")
    thinking: Literal["auto", "on", "off"] = Field(
        "auto", description="thinking models (Qwen3 enable_thinking): on, off, or the chat template's default"
    )

    extract_batch_tokens: int = Field(8192, ge=64, description="padded tokens per extraction batch")

    judge_model: str = Field("gpt-4.1-mini", description="judge model name on the judge endpoint")
    judge_base_url: str | None = Field(None, description="OpenAI-compatible endpoint (default: OpenAI)")
    judge_api_key: SecretStr | None = Field(None, description="judge API key (else OPENAI_API_KEY; never written)")
    judge_concurrency: int = Field(50, ge=1, description="judge requests in flight")
    judge_timeout: float = Field(60.0, gt=0, description="seconds per judge request attempt")
    judge_max_retries: int = Field(4, ge=0, description="retries on 429/5xx/timeouts, with backoff")
    judge_mode: Literal["auto", "single", "digits"] = Field(
        "auto", description="how to read 0-100 from the judge: one token, or digit by digit (auto probes)"
    )
    trait_threshold: float | None = Field(
        None, ge=0, le=100, description="pos trait ≥ it and neg trait < it (default: the trait file's, else 50)"
    )
    coherence_threshold: float | None = Field(
        None, ge=0, le=100, description="both sides' coherence ≥ it (default: the trait file's, else 50)"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = _toml_file.get()
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def _config_file(cli: dict[str, Any], config: Path | None) -> Path | None:
    if config is not None:
        if not config.is_file():
            raise ConfigError(f"config file not found: {config}", hint="pass an existing personactl.toml")
        return config
    workspace = cli.get("workspace") or os.environ.get(f"{ENV_PREFIX}WORKSPACE") or DEFAULT_WORKSPACE
    candidate = Path(workspace) / CONFIG_FILENAME
    return candidate if candidate.is_file() else None


def load_settings(cli: dict[str, Any] | None = None, config: Path | None = None) -> tuple[Settings, dict[str, str]]:
    """Build the effective settings and, per field, where its value came from."""
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    toml_file = _config_file(cli, config)
    token = _toml_file.set(toml_file)
    try:
        settings = Settings(**cli)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        where = _origin_of(field, cli, toml_file)
        raise ConfigError(
            f"invalid setting {field!r} from {where}: {err['msg']}",
            hint=f"fix it, or see `personactl config` (env var {ENV_PREFIX}{field.upper()})",
        ) from None
    except ValueError as exc:  # a TOML syntax error
        raise ConfigError(f"cannot read {toml_file}: {exc}", hint="check the TOML syntax") from None
    finally:
        _toml_file.reset(token)
    return settings, {name: _origin_of(name, cli, toml_file) for name in Settings.model_fields}


def _origin_of(field: str, cli: dict[str, Any], toml_file: Path | None) -> str:
    if field in cli:
        return "cli"
    if field in EnvSettingsSource(Settings)():
        return "env"
    if toml_file is not None and field in TomlConfigSettingsSource(Settings, toml_file=toml_file)():
        return str(toml_file)
    return "default"


def masked_dump(settings: Settings) -> dict[str, Any]:
    """Settings as JSON-safe values with secrets masked (for `config` output and manifests)."""
    out: dict[str, Any] = {}
    for name, value in settings:
        if isinstance(value, SecretStr):
            out[name] = "****" if value.get_secret_value() else ""
        elif isinstance(value, Path):
            out[name] = str(value)
        else:
            out[name] = value
    return out
