"""Policy documents from files: the I/O that :mod:`chargepath.core.plans` leaves out."""

from __future__ import annotations

from pathlib import Path

from chargepath.core.plans import PolicyDocument, PolicyError, PolicyIssue, load_policy_text


def load_policy_file(path: str | Path) -> PolicyDocument:
    """Read and validate a YAML (or JSON) policy file; raise
    :class:`~chargepath.core.plans.PolicyError` if it cannot be read or does not validate."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(
            [PolicyIssue(str(p), None, None, f"cannot read: {exc.strerror}")]
        ) from None
    return load_policy_text(text, source=str(p))


def refusal_lines(exc: PolicyError, what: str) -> list[str]:
    """How a command shows a plan file it refuses, for people: one issue is one line,
    ``<what>: file:line: field: reason``; several are a line that counts them, then one line
    each, ``file:line: field: reason``, in the order of the file."""
    if len(exc.issues) == 1:
        return [f"{what}: {exc.issues[0]}"]
    sources = sorted({issue.source for issue in exc.issues})
    return [f"{what}: {', '.join(sources)}: {len(exc.issues)} errors", *exc.errors]
