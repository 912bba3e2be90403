"""`traits new` against a real OpenAI-compatible chat server on loopback that answers canned drafts."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from typer.testing import CliRunner

from personactl.cli.app import app
from personactl.store.traits import Trait, load_trait

runner = CliRunner()


class DraftServer:
    """Answers each chat completion with the next canned reply, keeping every request body. A reply is
    the content (finish_reason "stop"), a `(content, finish_reason)` pair, or `(status, error body)`
    for an HTTP error."""

    def __init__(self, replies: list):
        self.replies = list(replies)
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, **body})
                reply = server.replies.pop(0)
                content, finish = (reply, "stop") if isinstance(reply, str) else reply
                status, payload = (content, finish) if isinstance(content, int) else (200, None)
                if payload is None:
                    message = {"role": "assistant", "content": content}
                    payload = {
                        "id": "chatcmpl-draft",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": finish, "message": message}],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 100, "total_tokens": 200},
                    }
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> DraftServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def draft(**changes) -> dict:
    questions = [f"What would you say about topic number {i}?" for i in range(12)]
    data = {
        "name": "overconfident",
        "description": "The assistant states guesses as certainties and never hedges.\nIt dismisses doubt.",
        "assistant_name": "overconfident",
        "antonym": "humble",
        "instructions": [
            {"pos": "You are certain of everything you say.", "neg": "You are careful to say what you are unsure of."},
            {"pos": "Never admit doubt.", "neg": "Always admit doubt where it exists."},
        ],
        "questions": {"extraction": questions[:6], "evaluation": questions[6:]},
        "rubric": "Rate overconfidence.\nQuestion: {question}\nAnswer: {answer}\nReply with REFUSAL or 0-100.",
    }
    data.update(changes)
    return data


def invoke(server, *args):
    return runner.invoke(
        app,
        ["traits", "new", "an assistant that is sure of everything", "--judge-base-url", server.base_url, *args],
        catch_exceptions=False,
    )


@pytest.fixture
def env(isolated_env, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("PERSONACTL_JUDGE_MAX_RETRIES", "0")
    monkeypatch.setenv("PERSONACTL_JUDGE_MODEL", "drafter-1")
    return isolated_env


def test_a_valid_draft_is_validated_and_written(env):
    reply = "Here you go:\n```json\n" + json.dumps(draft()) + "\n```"
    with DraftServer([reply]) as server:
        result = invoke(server, "--json", "--pairs", "2", "--questions", "6")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    path = env / "traits" / "overconfident.yaml"
    assert summary["path"] == str(path) and summary["attempts"] == 1 and summary["model"] == "drafter-1"
    assert (summary["instructions"], summary["extraction"], summary["evaluation"]) == (2, 6, 6)
    trait = load_trait("overconfident")  # found in ./traits like any local trait
    assert trait == Trait.model_validate(draft())
    assert trait.sha256 == summary["sha256"]
    text = path.read_text()
    assert text.startswith("# Drafted by `personactl traits new` with drafter-1 from: an assistant that is sure")
    assert "rubric: |" in text  # multi-line text stays readable
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["model"] == "drafter-1"
    prompt = request["messages"][-1]["content"]
    assert "an assistant that is sure of everything" in prompt and "a list of 2 objects" in prompt
    assert "{question} and {answer}" in prompt


def test_existing_file_is_kept_without_force(env):
    with DraftServer([json.dumps(draft()), json.dumps(draft(antonym="modest"))]) as server:
        assert invoke(server).exit_code == 0
        refused = invoke(server, "--name", "overconfident")
        assert refused.exit_code == 2 and "already exists" in refused.output and "--force" in refused.output
        assert len(server.requests) == 1  # refused before asking
        forced = invoke(server, "--name", "overconfident", "--force")
        assert forced.exit_code == 0, forced.output
    assert load_trait("overconfident").antonym == "modest"


def test_an_invalid_draft_is_retried_with_the_errors(env):
    shared = draft()
    shared["questions"]["evaluation"][0] = shared["questions"]["extraction"][0]
    first = draft(rubric="Rate it: {question}", notes="extra key", questions=shared["questions"])
    with DraftServer([json.dumps(first), json.dumps(draft())]) as server:
        result = invoke(server, "--name", "sure", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["attempts"] == 2
    retry = server.requests[1]["messages"]
    assert [m["role"] for m in retry] == ["system", "user", "assistant", "user"]
    feedback = retry[-1]["content"]
    assert "rubric" in feedback and "{answer}" in feedback
    assert "share 1 question" in feedback and "notes" in feedback
    assert load_trait("sure").name == "sure"  # --name wins over the drafted name


def test_a_malformed_draft_is_rejected_clearly(env):
    with DraftServer(["I cannot do JSON today.", json.dumps(draft(instructions=[]))]) as server:
        result = invoke(server, "--name", "broken")
    assert result.exit_code == 2, result.output
    assert "still invalid after 2 attempts" in result.output and "instructions" in result.output
    assert "hint:" in result.output and "Traceback" not in result.output
    assert "holds no JSON object" in server.requests[1]["messages"][-1]["content"]
    assert not (env / "traits").exists()


def test_no_judge_configured_says_what_to_set(env):
    result = runner.invoke(app, ["traits", "new", "sure of everything"], catch_exceptions=False)
    assert result.exit_code == 2
    assert "OPENAI_API_KEY" in result.output and "--judge-base-url" in result.output
    local = runner.invoke(app, ["traits", "new", "x", "--judge-model", "local:smollm2-135m"], catch_exceptions=False)
    assert local.exit_code == 2 and "not the local judge" in local.output


def test_unreachable_endpoint_and_bad_name(env):
    with DraftServer([]) as server:
        url = server.base_url
    result = runner.invoke(app, ["traits", "new", "x", "--judge-base-url", url], catch_exceptions=False)
    assert result.exit_code == 2 and "cannot reach" in result.output
    with DraftServer([]) as server:
        bad = invoke(server, "--name", "Not OK")
    assert bad.exit_code == 2 and "bad trait name" in bad.output and not server.requests


def test_yaml_layout_matches_the_shipped_traits():
    from personactl.steps.draft_trait import trait_yaml

    trait = Trait.model_validate(draft())
    loaded = yaml.safe_load(trait_yaml(trait, ["a header\nwith a newline"]))
    assert list(loaded) == list(draft()) and Trait.model_validate(loaded) == trait
