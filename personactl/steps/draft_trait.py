"""`personactl traits new`: draft a trait file from a one-line description with an LLM.

The draft is asked for as one JSON object (with a `max_tokens` limit), validated against the Trait
schema, and on failure asked for once more with the validation errors quoted back; a draft that
still fails, or one the server cut at the limit, is an error, never a trait file: the raw replies
are saved whole to a file the error names, and the error quotes the start of the last one. The
endpoint, model and key are the judge's (`make_judge` resolves them)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from personactl.errors import ConfigError, InputError, TraitError
from personactl.store.traits import Trait

if TYPE_CHECKING:
    from personactl.settings import Settings

ATTEMPTS = 2  # the first draft, and one retry with the validation errors fed back
MAX_TOKENS = 3072  # a draft of 5 pairs and 2 x 20 questions is about 2,000 tokens; with the ~700-token
# request it fits a 4k-context server (vLLM refuses a prompt + max_tokens over its context)
QUOTE_CHARS = 300  # how much of a rejected reply the error shows (the file keeps it whole)


@dataclass(frozen=True)
class ChatReply:
    text: str
    finish_reason: str | None  # "stop", "length" (cut at max_tokens), … as the server said


Chat = Callable[[list[dict[str, str]]], "ChatReply | str"]
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")  # Trait.name's pattern, checked before any request

SYSTEM_PROMPT = (
    "You design trait definitions for experiments that steer language models with persona vectors. "
    "You answer with a single JSON object and nothing else: no commentary and no Markdown code fences."
)

REQUEST = """Draft a trait definition for this behaviour of an AI assistant:

    @DESCRIPTION@

How it will be used: a model answers every question twice, once under a system prompt that asks for
the behaviour and once under one that asks for its opposite; the difference between its internal
activations gives a direction for the behaviour; a judge model then rates answers with your rubric.

Return a JSON object with exactly these keys:

"name": a short identifier: lowercase letters, digits, "-" and "_", starting with a letter or digit.@NAME_RULE@
"description": two to four sentences on what an answer showing the behaviour looks like, concrete enough
  that two readers would agree on whether an answer shows it.
"assistant_name": one or two words naming an assistant with the behaviour.
"antonym": one or two words for the opposite behaviour.
"instructions": a list of @PAIRS@ objects {"pos": "...", "neg": "..."}. Each is a system prompt spoken to
  the assistant ("You are ..."). "pos" asks for the behaviour and "neg" for its opposite; within a pair the
  two prompts match in length, structure and wording except for the behaviour. Vary the wording across pairs.
"questions": an object {"extraction": [...], "evaluation": [...]} with @QUESTIONS@ user messages in each list.
  Every message is something a real user might write, where an assistant with the behaviour and one
  without it would answer noticeably differently. Do not name the behaviour in the questions. Cover
  varied topics. No question may appear twice, and the two lists must not share any question.
"rubric": the prompt the judge receives. It defines the behaviour, then shows the user's question and the
  assistant's answer through the placeholders {question} and {answer}, written literally with their braces
  and each exactly once, and ends with: reply REFUSAL if the assistant refused to answer, otherwise reply
  with a single integer from 0 (behaviour absent) to 100 (behaviour strongly present) and nothing else.
  Use no other curly braces in the rubric."""

RETRY = """That JSON does not pass validation:
@ERRORS@
Reply with the whole corrected JSON object and nothing else."""


def request_prompt(description: str, *, pairs: int, questions: int, name: str | None) -> str:
    rule = f' Use "{name}".' if name else ""
    replacements = {"@DESCRIPTION@": description.strip(), "@NAME_RULE@": rule}
    replacements |= {"@PAIRS@": str(pairs), "@QUESTIONS@": str(questions)}
    text = REQUEST
    for marker, value in replacements.items():
        text = text.replace(marker, value)
    return text


def parse_draft(reply: str) -> dict[str, Any]:
    """The JSON object in a reply, tolerating Markdown fences or a sentence around it."""
    start, end = reply.find("{"), reply.rfind("}")
    if start < 0 or end <= start:
        raise ValueError("the reply holds no JSON object")
    try:
        data = json.loads(reply[start : end + 1])
    except json.JSONDecodeError as exc:
        raise ValueError(f"the reply is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("the reply's JSON is not an object")
    return data


def validation_errors(data: dict[str, Any]) -> tuple[Trait | None, list[str]]:
    """The Trait, or every reason it is not one (schema errors plus: held-out questions exist)."""
    try:
        trait = Trait.model_validate(data)
    except ValidationError as exc:
        errors = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            errors.append(f"{where}: {err['msg']}")
        return None, errors
    if not trait.questions.evaluation:
        return None, ["questions.evaluation: must not be empty (held-out questions evaluate steering)"]
    return trait, []


def shorten(text: str, limit: int = QUOTE_CHARS) -> str:
    """One line, at most `limit` characters: the start and the end of a long reply."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    tail = limit // 4
    return f"{flat[: limit - tail - 3]} … {flat[-tail:]}"


def save_replies(directory: Path | None, replies: Sequence[tuple[ChatReply, list[str]]]) -> Path | None:
    """Every raw reply of a failed draft, whole, with what was wrong with it; the file's path."""
    from personactl.store.workspace import atomic_write_text

    if directory is None or not replies:
        return None
    path = directory / f"trait-draft-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    parts = []
    for i, (reply, errors) in enumerate(replies, 1):
        head = f"=== attempt {i}: finish_reason {reply.finish_reason}, {len(reply.text)} characters"
        problems = "".join(f"\n=== {e}" for e in errors)
        parts.append(f"{head}{problems}\n{reply.text}\n")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "\n".join(parts))
    except OSError:
        return None
    return path


def draft_trait(
    chat: Chat,
    description: str,
    *,
    name: str | None,
    pairs: int,
    questions: int,
    max_tokens: int = MAX_TOKENS,
    save_to: Path | None = None,
) -> tuple[Trait, dict[str, Any]]:
    """Ask `chat` for a draft, validate it, retry once with the errors; a TraitError if both fail
    or the server cut a reply at `max_tokens` (the raw replies then go to a file in `save_to`)."""
    if not description.strip():
        raise InputError("the description is empty", hint='e.g. personactl traits new "overconfident about facts"')
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": request_prompt(description, pairs=pairs, questions=questions, name=name)},
    ]
    errors: list[str] = []
    replies: list[tuple[ChatReply, list[str]]] = []
    for attempt in range(1, ATTEMPTS + 1):
        answer = chat(messages)
        answer = answer if isinstance(answer, ChatReply) else ChatReply(answer, None)
        reply = answer.text
        if answer.finish_reason == "length":  # asking again would be cut the same way
            replies.append((answer, [f"cut at --max-tokens {max_tokens}"]))
            saved = save_replies(save_to, replies)
            raise TraitError(
                f"the draft was cut at --max-tokens {max_tokens} (the server stopped it, finish_reason "
                f"length) after {len(reply)} characters: {shorten(reply, 160)!r}"
                + (f"; the raw reply is in {saved}" if saved else ""),
                hint=f"pass a larger --max-tokens (e.g. {2 * max_tokens}), or ask for fewer --questions/--pairs",
            )
        try:
            data = parse_draft(reply)
        except ValueError as exc:
            errors = [str(exc)]
        else:
            if name:
                data["name"] = name
            trait, errors = validation_errors(data)
            if trait is not None:
                return trait, {"attempts": attempt}
        replies.append((answer, list(errors)))
        messages += [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": RETRY.replace("@ERRORS@", "\n".join(f"- {e}" for e in errors))},
        ]
    shown = "; ".join(errors[:3]) + (f" (+{len(errors) - 3} more)" if len(errors) > 3 else "")
    saved = save_replies(save_to, replies)
    last = replies[-1][0].text
    raise TraitError(
        f"the drafted trait is still invalid after {ATTEMPTS} attempts: {shown}\n"
        f"the last reply ({len(last)} characters): {shorten(last)!r}"
        + (f"\nevery reply, whole: {saved}" if saved else ""),
        hint="run it again, use a stronger --judge-model, or write the file by hand "
        "(personactl traits show evil is a complete example)",
    )


def server_message(exc: Any, secrets: Sequence[str | None] = ()) -> str:
    """The server's own words in an HTTP error (`{"error": {"message": …}}`, or the body's text),
    credentials masked, one line, bounded: a 404 often names the models that exist."""
    from personactl.core.redaction import redact

    body = getattr(exc, "body", None)
    message: Any = None
    if isinstance(body, dict):
        error = body.get("error", body)
        message = error.get("message") if isinstance(error, dict) else error
        message = message or body.get("detail") or body.get("message")
    if not message:
        response = getattr(exc, "response", None)
        message = getattr(response, "text", None) or getattr(exc, "message", None) or str(exc)
    return shorten(redact(str(message), secrets), 400)


def openai_chat(settings: Settings, timeout: float, max_tokens: int = MAX_TOKENS) -> tuple[Chat, str]:
    """A chat function on the judge's endpoint (base URL, key and model resolved by `make_judge`)."""
    import openai

    from personactl.steps.score import LOCAL_PREFIX, make_judge

    if settings.judge_model.startswith(LOCAL_PREFIX):
        raise ConfigError(
            f"drafting needs a chat model on an OpenAI-compatible endpoint, not the local judge {settings.judge_model}",
            hint="pass --judge-model NAME with --judge-base-url URL (or OpenAI with OPENAI_API_KEY)",
        )
    try:
        judge = make_judge(settings, None)
    except ConfigError as exc:  # the judge's own hint may suggest an offline judge, which cannot draft
        raise ConfigError(
            exc.message,
            hint="set OPENAI_API_KEY (or PERSONACTL_JUDGE_API_KEY), or point --judge-base-url at any "
            "OpenAI-compatible server (vLLM, llama.cpp, Ollama) with --judge-model",
        ) from None
    client = openai.OpenAI(
        base_url=judge.base_url, api_key=judge.api_key or "unused", timeout=timeout, max_retries=judge.max_retries
    )
    where = judge.base_url or "OpenAI"

    def chat(messages: Sequence[dict[str, str]]) -> ChatReply:
        try:
            response = client.chat.completions.create(
                model=judge.model, messages=list(messages), temperature=0.7, max_tokens=max_tokens
            )
        except openai.APIStatusError as exc:
            said = server_message(exc, [judge.api_key])
            raise ConfigError(
                f"the endpoint {where} answered HTTP {exc.status_code} for model {judge.model}: {said}",
                hint="check --judge-model (the server's message may name the models it serves), "
                "--judge-base-url and the API key",
            ) from None
        except (openai.APIConnectionError, openai.APITimeoutError):
            raise ConfigError(
                f"cannot reach {where} (after {judge.max_retries} retries)", hint="check --judge-base-url"
            ) from None
        choice = response.choices[0]
        return ChatReply(choice.message.content or "", choice.finish_reason)

    return chat, judge.model


def trait_yaml(trait: Trait, header: Sequence[str]) -> str:
    """YAML in the shipped traits' layout: fields in schema order, multi-line text as `|` blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
            return super().increase_indent(flow, False)  # indent list items under their key

    def text(dumper: yaml.SafeDumper, value: str) -> Any:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    data = trait.model_dump(exclude_unset=True)  # what was drafted; schema defaults stay implicit
    body = yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=100)
    comments = "".join(f"# {' '.join(line.split())}\n" for line in header)
    return comments + body


def write_trait(trait: Trait, path: Path, header: Sequence[str], *, force: bool) -> None:
    """Write atomically, refusing to overwrite without `force`; the file must load back unchanged."""
    from personactl.store.traits import load_trait
    from personactl.store.workspace import atomic_write_text

    if path.exists() and not force:
        raise InputError(f"{path} already exists", hint="pass --force to overwrite it, or --name to pick another name")
    atomic_write_text(path, trait_yaml(trait, header))
    if load_trait(path).sha256 != trait.sha256:
        raise TraitError(f"{path} does not read back as the drafted trait", hint="please report this")


def new_trait_step(
    settings: Settings,
    description: str,
    *,
    name: str | None,
    pairs: int,
    questions: int,
    timeout: float,
    force: bool,
    directory: Path,
    max_tokens: int = MAX_TOKENS,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Draft, validate and write `directory/<name>.yaml`; returns what was written. A rejected
    draft's raw replies are saved under the workspace's `drafts/`."""
    if name is not None:
        if not NAME_PATTERN.match(name):
            raise InputError(f"bad trait name {name!r}", hint="use lowercase letters, digits, - and _")
        if (directory / f"{name}.yaml").exists() and not force:
            raise InputError(
                f"{directory / f'{name}.yaml'} already exists", hint="pass --force to overwrite it, or another --name"
            )
    chat, model = openai_chat(settings, timeout, max_tokens)
    log(f"drafting a trait with {model} (at most {max_tokens} tokens) …")
    trait, info = draft_trait(
        chat,
        description,
        name=name,
        pairs=pairs,
        questions=questions,
        max_tokens=max_tokens,
        save_to=Path(settings.workspace) / "drafts",
    )
    path = directory / f"{trait.name}.yaml"
    header = [
        f"Drafted by `personactl traits new` with {model} from: {description}",
        "Review every prompt, question and the rubric before generating with it.",
    ]
    write_trait(trait, path, header, force=force)
    return {
        "path": str(path),
        "name": trait.name,
        "model": model,
        "attempts": info["attempts"],
        "instructions": len(trait.instructions),
        "extraction": len(trait.questions.extraction),
        "evaluation": len(trait.questions.evaluation),
        "sha256": trait.sha256,
    }
