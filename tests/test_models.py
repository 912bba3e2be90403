from __future__ import annotations

import json

import pytest
from conftest import ARCHES

from personactl.errors import ModelError
from personactl.model.chat_format import chat_messages, encode_example, encode_prompt, render_prompt
from personactl.model.loading import load_model, resolve_model

quiet = dict(dtype="float32", device="cpu", log=lambda m: None)


@pytest.mark.parametrize("arch", ARCHES)
def test_decoder_layers_found_for_each_architecture(tiny_factory, arch):
    lm = load_model(str(tiny_factory(arch)), **quiet)
    assert lm.num_layers == 3 and lm.hidden_size == 32
    assert lm.describe()["num_layers"] == 3
    assert lm.fingerprint.startswith("sha256:")


def test_resolve_model_kinds(tmp_path):
    assert resolve_model("smollm2-135m").kind == "builtin"
    assert resolve_model("Qwen/Qwen2.5-7B-Instruct").kind == "hub"
    assert resolve_model("Qwen/Qwen2.5-7B-Instruct").slug == "Qwen/Qwen2.5-7B-Instruct"
    for bad in ("./missing-dir", str(tmp_path / "nope.gguf"), "not a model!", str(tmp_path)):
        with pytest.raises(ModelError):
            resolve_model(bad)


def test_hub_id_without_network_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as info:
        load_model("no-such-org/no-such-model", **quiet)
    assert "cannot load 'no-such-org/no-such-model' from the hub" in info.value.message
    assert "smollm2-135m" in info.value.hint


def test_remote_code_is_opt_in(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "personactl-custom",
                "architectures": ["CustomForCausalLM"],
                "auto_map": {
                    "AutoConfig": "configuration_custom.CustomConfig",
                    "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
                },
            }
        )
    )
    with pytest.raises(ModelError) as info:
        load_model(str(tmp_path), **quiet)
    assert "--trust-remote-code" in info.value.hint


def test_missing_pad_and_chat_template_fall_back(tiny_factory):
    notes = []
    lm = load_model(str(tiny_factory("gpt2", "plain")), dtype="float32", device="cpu", log=notes.append)
    assert lm.tokenizer.pad_token_id == lm.tokenizer.eos_token_id
    assert any("no pad token" in n for n in notes) and any("no chat template" in n for n in notes)
    text = render_prompt(lm.tokenizer, chat_messages("Be kind.", "Hi?"))
    assert text == "Be kind.\n\nUser: Hi?\n\nAssistant:"


def test_system_role_folded_when_template_rejects_it(tiny_factory):
    lm = load_model(str(tiny_factory("llama")), **quiet)
    lm.tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    )
    assert render_prompt(lm.tokenizer, chat_messages("Be kind.", "Hi?")) == "<user>Be kind.\n\nHi?<assistant>"


def test_encoded_spans_decode_to_their_parts(tiny_factory):
    lm = load_model(str(tiny_factory("llama")), **quiet)
    tok = lm.tokenizer
    messages = chat_messages("You are cheerful.", "what about the weather today?")
    ex = encode_example(tok, messages, "It might rain tomorrow, but the fox is quick.")
    assert tok.decode(ex.input_ids[: ex.prompt_len]) == render_prompt(tok, messages)
    assert tok.decode(ex.input_ids[ex.prompt_len :]) == "It might rain tomorrow, but the fox is quick."
    assert list(ex.input_ids[: ex.prompt_len]) == encode_prompt(tok, messages)
    by_ids = encode_example(tok, messages, response_ids=[5, 6, 7])
    assert by_ids.input_ids[by_ids.prompt_len :] == (5, 6, 7)
