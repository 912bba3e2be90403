from __future__ import annotations

import pytest

from personactl.errors import ConfigError
from personactl.settings import load_settings, masked_dump


def test_precedence_cli_env_toml_default(isolated_env, monkeypatch):
    ws = isolated_env / "ws"
    ws.mkdir()
    (ws / "personactl.toml").write_text("max_new_tokens = 11\ntemperature = 0.5\ntop_p = 0.9\n")
    monkeypatch.setenv("PERSONACTL_WORKSPACE", str(ws))
    monkeypatch.setenv("PERSONACTL_TEMPERATURE", "0.7")
    monkeypatch.setenv("PERSONACTL_TOP_P", "0.8")
    settings, sources = load_settings({"top_p": 0.3})
    assert settings.top_p == 0.3 and sources["top_p"] == "cli"
    assert settings.temperature == 0.7 and sources["temperature"] == "env"
    assert settings.max_new_tokens == 11 and sources["max_new_tokens"] == str(ws / "personactl.toml")
    assert settings.seed == 0 and sources["seed"] == "default"


def test_explicit_config_file_and_missing_one(isolated_env):
    cfg = isolated_env / "custom.toml"
    cfg.write_text("seed = 42\n")
    settings, sources = load_settings({}, cfg)
    assert settings.seed == 42 and sources["seed"] == str(cfg)
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings({}, isolated_env / "missing.toml")


def test_bad_values_name_the_setting_and_source(isolated_env, monkeypatch):
    monkeypatch.setenv("PERSONACTL_MAX_NEW_TOKENS", "lots")
    with pytest.raises(ConfigError) as info:
        load_settings({})
    assert "max_new_tokens" in info.value.message and "env" in info.value.message
    monkeypatch.delenv("PERSONACTL_MAX_NEW_TOKENS")
    cfg = isolated_env / "c.toml"
    cfg.write_text("no_such_setting = 1\n")
    with pytest.raises(ConfigError, match="no_such_setting"):
        load_settings({}, cfg)
    cfg.write_text("seed = = 3\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings({}, cfg)


def test_secrets_are_masked(isolated_env, monkeypatch):
    monkeypatch.setenv("PERSONACTL_HF_TOKEN", "hf_supersecret")
    settings, _ = load_settings({})
    dumped = masked_dump(settings)
    assert dumped["hf_token"] == "****"
    assert "hf_supersecret" not in repr(dumped) and "hf_supersecret" not in repr(settings)
    assert settings.hf_token.get_secret_value() == "hf_supersecret"
