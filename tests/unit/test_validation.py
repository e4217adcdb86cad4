import pytest

from chargepath.core.model import Mode, Subject, Usage
from chargepath.core.validation import MAX_AMOUNT, validate_usage


def usage(**kw: object) -> Usage:
    base: dict[str, object] = dict(
        request_id="r-1",
        subject=Subject("acme", "1-000001", "key-1"),
        metric="api.sms.send",
        amount=1,
        mode=Mode.ADMIT,
    )
    base.update(kw)
    return Usage(**base)  # type: ignore[arg-type]


def fields(u: Usage, on_stream: bool = False) -> list[str]:
    return [v.field for v in validate_usage(u, on_stream=on_stream)]


def test_valid_usage_has_no_violation() -> None:
    assert fields(usage()) == []


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"subject": Subject("")}, "subject.tenant"),
        ({"subject": Subject("a{b}")}, "subject.tenant"),
        ({"subject": Subject("t" * 65)}, "subject.tenant"),
        ({"subject": Subject("acme", "s" * 10_000)}, "subject.slice"),
        ({"subject": Subject("acme", "", "k:1")}, "subject.key"),
        ({"amount": 0}, "amount"),
        ({"amount": -5}, "amount"),
        ({"amount": MAX_AMOUNT + 1}, "amount"),
        ({"mode": Mode.UNSPECIFIED}, "mode"),
        ({"request_id": ""}, "request_id"),
        ({"request_id": "x" * 10_000}, "request_id"),
        ({"request_id": "has space"}, "request_id"),
        ({"metric": ""}, "metric"),
        ({"metric": "API.SMS"}, "metric"),
        ({"labels": tuple((f"k{i}", "v") for i in range(5000))}, "labels"),
        ({"labels": (("k", "v" * 300),)}, "labels[k]"),
        ({"session_id": "s-1", "sequence": 3}, "session_id"),
        ({"sequence": 3}, "sequence"),
    ],
)
def test_each_bad_field_is_named(kw: dict[str, object], field: str) -> None:
    assert field in fields(usage(**kw))


def test_long_values_are_not_echoed_whole() -> None:
    (v,) = validate_usage(usage(request_id="x" * 10_000), on_stream=False)
    assert len(v.reason) < 200
    assert "10000 characters" in v.reason


def test_session_fields_are_fine_on_streams() -> None:
    assert fields(usage(session_id="s-1", sequence=3), on_stream=True) == []
