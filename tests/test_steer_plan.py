"""The `--steer SPEC` grammar: read from the right, so vectors may hold `:`; every malformed part is
one InputError naming it."""

from __future__ import annotations

import pytest

from personactl.core.steer_plan import PlanTerm, parse_term
from personactl.errors import InputError


@pytest.mark.parametrize(
    ("spec", "term"),
    [
        ("optimistic:12:4", PlanTerm("optimistic", (12,), "add", 4.0)),
        ("optimistic:user:12:-2.5", PlanTerm("optimistic:user", (12,), "add", -2.5)),
        ("optimistic:user:5-7:1:add", PlanTerm("optimistic:user", (5, 6, 7), "add", 1.0)),
        ("evil:4,8-9:0:ablate", PlanTerm("evil", (4, 8, 9), "ablate", 0.0)),
        ("evil@response_avg:10-11:p25:cap", PlanTerm("evil", (10, 11), "cap", None, 25.0, "response_avg")),
        ("evil@prompt_end/pca:3:7.5:cap", PlanTerm("evil", (3,), "cap", 7.5, None, "prompt_end", "pca")),
        ("axis:5-7:saved:cap", PlanTerm("axis", (5, 6, 7), "cap", None)),
        ("kind:user@user_avg/probe:3:2", PlanTerm("kind:user", (3,), "add", 2.0, None, "user_avg", "probe")),
        ("vectors/a:b.safetensors:2:1:mean-ablate", PlanTerm("vectors/a:b.safetensors", (2,), "mean-ablate", 1.0)),
    ],
)
def test_specs_parse_from_the_right(spec: str, term: PlanTerm) -> None:
    assert parse_term(spec) == term
    assert parse_term(term.spec()) == term  # written back, it parses to the same term


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("evil:12:4:scale", "unknown steering operation 'scale'"),
        ("evil:12:four", "bad value 'four'"),
        ("evil:12:nan", "not finite"),
        ("evil:12:p25", "only `cap` takes one"),
        ("evil:12:p25:ablate", "only `cap` takes one"),
        ("evil:12:saved", "for cap only"),
        ("evil:twelve:4", "bad layers 'twelve'"),
        ("evil:12", "bad --steer"),
        ("evil:12:cap", "gives no VALUE for cap"),
        ("evil:12::cap", "bad --steer"),
        ("evil::4", "bad --steer"),
        (":12:4", "no vector"),
        ("evil@:12:4", "bad position ''"),
        ("evil@Prompt End:12:4", "bad position 'Prompt End'"),
        ("evil@response_avg/median:12:4", "unknown aggregator 'median'"),
    ],
)
def test_malformed_specs_are_one_clear_error(spec: str, says: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_term(spec)
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)
