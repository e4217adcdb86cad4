import pytest

from chargepath.core.units import (
    DEFAULT_UNIT,
    UNITS,
    UnitKind,
    accepted,
    suggestion,
    unit_of,
    unit_problem,
)


def test_every_listed_unit_has_a_kind_and_a_size_in_its_base() -> None:
    assert DEFAULT_UNIT in UNITS and UNITS[DEFAULT_UNIT].kind is UnitKind.COUNT
    assert {k for u in UNITS.values() for k in [u.kind]} == set(UnitKind)
    assert (UNITS["kilobyte"].kind, UNITS["kilobyte"].base) == (UnitKind.BYTES, 1_000)
    assert (UNITS["minute"].kind, UNITS["minute"].base) == (UnitKind.DURATION, 60_000)
    assert UNITS["message"].base == 1 and UNITS["byte"].base == 1
    # the units of the repository's own plan files are listed
    for name in ("byte", "session", "message", "minute", "request"):
        assert unit_of(name) is UNITS[name]


@pytest.mark.parametrize("name", ["x-credits", "x-api.tokens", "x-9"])
def test_a_custom_unit_counts(name: str) -> None:
    unit = unit_of(name)
    assert unit is not None and (unit.name, unit.kind, unit.base) == (name, UnitKind.COUNT, 1)
    assert unit_problem(name) is None


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("MB", "megabyte"),
        ("kB", "kilobyte"),
        ("bytes", "byte"),
        ("Byte", "byte"),
        ("messages", "message"),
        ("mesage", "message"),
        ("secs", "second"),
        ("ms", "millisecond"),
        ("count", "unit"),
        ("furlong", None),
        ("x-", None),
        ("X-Credits", None),
        ("", None),
    ],
)
def test_an_unknown_unit_is_refused_with_a_suggestion_and_the_list(
    name: str, hint: str | None
) -> None:
    assert unit_of(name) is None
    assert suggestion(name) == hint
    problem = unit_problem(name)
    assert problem is not None and problem.startswith(f"unknown unit {name!r}: ")
    assert (f"did you mean {hint!r}? " in problem) == (hint is not None)
    assert problem.endswith("accepted units are " + accepted())
    assert "\n" not in problem


def test_the_list_for_people_names_every_unit_by_kind() -> None:
    text = accepted()
    assert text.startswith("count: unit, request, call, message, event, session; bytes: byte,")
    assert all(name in text for name in UNITS) and "x-<name>" in text
