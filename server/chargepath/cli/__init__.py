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

from chargepath import __version__
from chargepath.cli import admin, audit, check, keys, ledger, serve, webhooks


def main(argv: list[str] | None = None) -> int:
    """The console script ``chargepath``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="chargepath", description=__doc__)
    parser.add_argument("--version", action="version", version=f"chargepath {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(sub)
    check.add_parser(sub)
    admin.add_parsers(sub)
    keys.add_parser(sub)
    ledger.add_parser(sub)
    audit.add_parser(sub)
    webhooks.add_parser(sub)
    args = parser.parse_args(argv)
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
