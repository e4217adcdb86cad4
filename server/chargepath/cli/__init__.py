"""The ``chargepath`` command: ``serve`` runs a gateway, ``check`` asks one for a verdict,
``keys`` manages its API keys."""

# The process layer, imported by nothing else in chargepath. One module per group of commands,
# each adding its parsers and running them: serve (the gateway, through chargepath.supervisor),
# check (one verdict), admin (the AdminService commands), keys (the KeyService commands), ledger
# (the billing feed), audit (the trail of admin changes), webhooks (the delivery log); render
# holds the terminal output they share, connection how the commands that call the gateway reach
# it (address, TLS, credential). The module docstring above is `chargepath --help`.

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import NoReturn

from chargepath import __version__
from chargepath.cli import admin, audit, check, keys, ledger, serve, values, webhooks


class Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``chargepath grant: --expires: reason``) and
    exit status 2; subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        message = (
            message.replace("argument ", "", 1) if message.startswith("argument ") else message
        )
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def format_help(self) -> str:
        return plain_text(super().format_help())


def plain_text(text: str) -> str:
    """Help text without the reStructuredText of docstrings: ``code`` and :role:`name` become
    their words."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"``([^`]+)``", r"\1", text)


def main(argv: list[str] | None = None) -> int:
    """The console script ``chargepath``; returns the exit status: 0 done, 1 the gateway (or
    the store) refused or failed, 2 bad usage (a flag, an argument, a file), 3 ``check`` got
    THROTTLE or DENY. Errors are one line on stderr, never a traceback (unless
    ``CHARGEPATH_TRACEBACK=1``)."""
    try:
        return _main(argv)
    except values.UsageError as exc:
        print(f"chargepath: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader (head, less) went away; nothing left to say
        sys.stderr.close()
        return 0
    except Exception as exc:
        if os.environ.get("CHARGEPATH_TRACEBACK") == "1":
            raise
        text = " ".join(str(exc).split())[:300] or type(exc).__name__
        print(
            f"chargepath: unexpected error ({type(exc).__name__}): {text} "
            "(CHARGEPATH_TRACEBACK=1 shows where)",
            file=sys.stderr,
        )
        return 1


def build_parser() -> Parser:
    """The parser of every command (tests walk it to try each flag)."""
    parser = Parser(prog="chargepath", description=__doc__)
    parser.add_argument("--version", action="version", version=f"chargepath {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(sub)
    check.add_parser(sub)
    admin.add_parsers(sub)
    keys.add_parser(sub)
    ledger.add_parser(sub)
    audit.add_parser(sub)
    webhooks.add_parser(sub)
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve.run(args)
    if args.command in admin.COMMANDS:
        return admin.run(args)
    if args.command == "keys":
        return keys.run(args)
    if args.command == "ledger":
        return ledger.run(args)
    if args.command == "audit":
        return audit.run(args)
    if args.command == "webhooks":
        return webhooks.run(args)
    return check.run(args)
