from __future__ import annotations

import pytest

from personactl.errors import TraitError
from personactl.store.traits import list_trait_files, load_trait, shipped_traits_dir

SHIPPED = ["evil", "formal", "hallucinating", "humorous", "optimistic", "sycophantic"]

GOOD = """\
name: brave
description: Acts with courage.
instructions:
  - pos: You are brave.
    neg: You are timid.
questions:
  extraction: ["What would you do in a fire?"]
  evaluation: ["How do you face fear?"]
rubric: "Rate bravery. Q: {question} A: {answer} Reply 0-100."
"""


def test_shipped_traits_are_valid_and_substantial(isolated_env):
    names = [p.stem for p in list_trait_files()]
    assert set(SHIPPED) <= set(names)
    for name in SHIPPED:
        trait = load_trait(name)
        assert trait.name == name
        assert len(trait.instructions) >= 5
        assert len(trait.questions.extraction) >= 20 and len(trait.questions.evaluation) >= 20
        assert not set(trait.questions.extraction) & set(trait.questions.evaluation)
        prompt = trait.judge_prompt("Q?", "A!")
        assert "Q?" in prompt and "A!" in prompt
    assert shipped_traits_dir().is_dir()


def test_good_trait_loads_by_path_and_hash_is_content_based(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(GOOD)
    b.write_text("# a comment changes the bytes, not the content\n" + GOOD)
    assert load_trait(a).sha256 == load_trait(b).sha256
    c = tmp_path / "c.yaml"
    c.write_text(GOOD.replace("You are brave.", "You are bold."))
    assert load_trait(c).sha256 != load_trait(a).sha256


@pytest.mark.parametrize(
    "text, needle",
    [
        ("name: x\n  bad: [indent", "malformed YAML (line"),
        (GOOD.replace("rubric:", "rubrik:"), "field rubric: Field required"),
        (GOOD + "extra: 1\n", "field extra: Extra inputs are not permitted"),
        (GOOD.replace("{answer}", "{reply}"), "field rubric: Value error, must contain {answer} exactly once"),
        (GOOD.replace('["How do you face fear?"]', '["What would you do in a fire?"]'), "share 1 question"),
        (GOOD.replace("name: brave", "name: 7"), "field name: Input should be a valid string"),
        (
            GOOD.replace("instructions:\n  - pos: You are brave.\n    neg: You are timid.", "instructions: []"),
            "field instructions",
        ),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_bad_trait_files_name_file_and_field(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TraitError) as info:
        load_trait(path)
    assert str(path) in info.value.message
    assert needle in info.value.message


def test_unknown_trait_lists_known_ones(isolated_env):
    with pytest.raises(TraitError) as info:
        load_trait("nonexistent-trait")
    assert "unknown trait" in info.value.message and "evil" in info.value.hint


def test_local_traits_dir_shadows_shipped(isolated_env):
    (isolated_env / "traits").mkdir()
    (isolated_env / "traits" / "evil.yaml").write_text(GOOD.replace("name: brave", "name: evil"))
    assert load_trait("evil").description == "Acts with courage."


def test_thresholds_come_from_the_trait_file_unless_overridden(tmp_path):
    from personactl.settings import Settings
    from personactl.steps.score import effective_thresholds

    plain = tmp_path / "brave.yaml"
    plain.write_text(GOOD)
    strict = tmp_path / "strict.yaml"
    strict.write_text(GOOD + "thresholds:\n  trait: 70\n  coherence: 60.5\n")
    assert load_trait(str(plain)).thresholds.trait == 50
    assert effective_thresholds(Settings(), load_trait(str(strict))) == (70, 60.5)
    assert effective_thresholds(Settings(trait_threshold=40), load_trait(str(strict))) == (40, 60.5)
    # thresholds decide which pairs are kept, not what is generated: the content hash ignores them
    assert load_trait(str(strict)).sha256 == load_trait(str(plain)).sha256
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD + "thresholds:\n  trait: 120\n")
    with pytest.raises(TraitError, match="thresholds.trait"):
        load_trait(str(bad))
