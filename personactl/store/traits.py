"""Trait files: schema and loading with errors that name the file and the field."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from personactl.errors import TraitError
from personactl.store.text_input import read_user_text

NonEmpty = Field(min_length=1)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class InstructionPair(_Strict):
    """Two system prompts that differ only in the trait: `pos` elicits it, `neg` suppresses it."""

    pos: str = NonEmpty
    neg: str = NonEmpty

    @field_validator("pos", "neg")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("is only whitespace")
        return text


def question_key(question: str) -> str:
    """What makes two questions the same to a model: case, spacing and trailing blanks do not count."""
    return " ".join(question.split()).casefold()


class Questions(_Strict):
    """User prompts; `extraction` builds vectors, `evaluation` is held out for judging steering."""

    extraction: list[str] = Field(min_length=1)
    evaluation: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _disjoint_and_unique(self) -> Questions:
        for name, items in (("extraction", self.extraction), ("evaluation", self.evaluation)):
            if any(not q.strip() for q in items):
                raise ValueError(f"{name} contains an empty question")
            if len({question_key(q) for q in items}) != len(items):
                raise ValueError(f"{name} contains duplicate questions (ignoring case and spacing)")
        held_out = {question_key(q) for q in self.evaluation}
        shared = sorted(q for q in self.extraction if question_key(q) in held_out)
        if shared:
            raise ValueError(
                f"extraction and evaluation share {len(shared)} question(s) (ignoring case and spacing), "
                f"e.g. {shared[0]!r}"
            )
        return self


class Thresholds(_Strict):
    """The score filter for this trait: keep a pair when pos trait ≥ `trait` > neg trait and both
    sides' coherence ≥ `coherence`. CLI flags, env and personactl.toml override these."""

    trait: float = Field(50.0, ge=0, le=100)
    coherence: float = Field(50.0, ge=0, le=100)


class Trait(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    description: str = NonEmpty
    assistant_name: str | None = None
    antonym: str | None = None
    instructions: list[InstructionPair] = Field(min_length=1)
    questions: Questions
    rubric: str = NonEmpty
    thresholds: Thresholds = Field(default_factory=Thresholds)

    @field_validator("rubric")
    @classmethod
    def _rubric_placeholders(cls, rubric: str) -> str:
        for placeholder in ("{question}", "{answer}"):
            if rubric.count(placeholder) != 1:
                raise ValueError(f"must contain {placeholder} exactly once")
        return rubric

    def judge_prompt(self, question: str, answer: str) -> str:
        """The rubric filled in. Plain replacement, so other braces in the rubric are left alone."""
        return self.rubric.replace("{question}", question).replace("{answer}", answer)

    @property
    def sha256(self) -> str:
        """Hash of the content (not the file bytes), recorded with every artifact made from it.
        The filter thresholds are left out: they change which pairs are kept, not what is generated,
        and the scores record them on their own."""
        canonical = json.dumps(self.model_dump(exclude={"thresholds"}), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()


def shipped_traits_dir() -> Path:
    """Traits shipped with personactl: the repo's `traits/` or the copy inside an installed wheel."""
    package = Path(__file__).resolve().parents[1]  # the personactl package (this file is in store/)
    for candidate in (package / "shipped_traits", package.parent / "traits"):
        if candidate.is_dir():
            return candidate
    return package / "shipped_traits"


def search_dirs() -> list[Path]:
    """Where a trait *name* is looked up, first match wins: ./traits, then the shipped traits."""
    dirs = [Path.cwd() / "traits", shipped_traits_dir()]
    unique: list[Path] = []
    for d in dirs:
        if d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def resolve_trait_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        if path.is_file():
            return path
        raise TraitError(f"trait file not found: {path}", hint="check the path")
    for directory in search_dirs():
        for suffix in (".yaml", ".yml"):
            candidate = directory / f"{name_or_path}{suffix}"
            if candidate.is_file():
                return candidate
    known = ", ".join(sorted(p.stem for p in list_trait_files())) or "none"
    raise TraitError(f"unknown trait {name_or_path!r}", hint=f"known traits: {known}; or pass a .yaml path")


def list_trait_files() -> list[Path]:
    seen: dict[str, Path] = {}
    for directory in search_dirs():
        if directory.is_dir():
            for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
                seen.setdefault(path.stem, path)
    return [seen[k] for k in sorted(seen)]


def load_trait(name_or_path: str | Path) -> Trait:
    """Load and validate a trait by name (see `search_dirs`) or by path."""
    path = resolve_trait_path(str(name_or_path))
    try:
        data = yaml.safe_load(read_user_text(path, "trait file", TraitError))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TraitError(f"{path}: malformed YAML{where}: {problem}", hint="fix the YAML syntax") from None
    except OSError as exc:
        raise TraitError(f"{path}: cannot read: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise TraitError(f"{path}: expected a mapping of trait fields, got {type(data).__name__}")
    try:
        return Trait.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise TraitError(
            f"{path}: field {field}: {err['msg']}{more}",
            hint="see `personactl traits show evil` for a complete example",
        ) from None
