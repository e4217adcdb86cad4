"""How the load generator authenticates to its target: TLS (optionally with a client
certificate, for mTLS) and an API key, the same options as the Go and Node.js examples'.

Plaintext and no key by default. The API key goes as ``authorization: Bearer KEY`` metadata on
every call, over TLS or not (a gateway on loopback may take keys without TLS).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import grpc

from loadtest.drivers import Metadata


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """Paths of the PEM files (empty: not given) and the API key (empty: none)."""

    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    api_key: str = ""

    @property
    def tls(self) -> bool:
        """Any TLS file given turns TLS on; without --tls-ca the system's CAs are trusted."""
        return bool(self.tls_ca or self.tls_cert or self.tls_key)

    def problems(self) -> list[str]:
        """What is wrong with the options (unreadable files, a certificate without its key),
        one line each; empty when they can be used."""
        out = []
        if bool(self.tls_cert) != bool(self.tls_key):
            out.append("--tls-cert and --tls-key go together")
        for flag, path in (
            ("--tls-ca", self.tls_ca),
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
        ):
            if path:
                try:
                    Path(path).read_bytes()
                except OSError as exc:
                    out.append(f"{flag} {path}: cannot read: {exc.strerror or exc}")
        if not self.api_key.isascii() or not self.api_key.isprintable():
            out.append("--api-key must be printable ASCII")
        return out

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials for ``grpc.aio.secure_channel``, or None for plaintext."""
        if not self.tls:
            return None

        def read(path: str) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.tls_ca),
            private_key=read(self.tls_key),
            certificate_chain=read(self.tls_cert),
        )

    def call_metadata(self, metadata: Metadata) -> Metadata:
        """``metadata`` with the API key's ``authorization`` entry added, if there is a key."""
        if not self.api_key:
            return metadata
        return (*metadata, ("authorization", f"Bearer {self.api_key}"))

    def go_args(self) -> list[str]:
        """The TLS options for ``chargepath-loadgen`` (clients/go/internal/clientcreds). Not
        the API key: a command line is visible to every user of the machine, so the key goes
        to the Go side with the call metadata of each phase, on its stdin."""
        args = []
        for flag, value in (
            ("--tls-ca", self.tls_ca),
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
        ):
            if value:
                args += [flag, value]
        return args


PLAINTEXT = ClientCredentials()
"""No TLS, no API key: the default."""


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """The command-line options of :class:`ClientCredentials`."""
    group.add_argument(
        "--tls-ca",
        default="",
        metavar="FILE",
        help="connect over TLS, trusting the CA certificates in this PEM file (default: "
        "plaintext; with only --tls-cert/--tls-key, the system's CAs)",
    )
    group.add_argument(
        "--tls-cert",
        default="",
        metavar="FILE",
        help="mTLS: the client certificate chain, a PEM file (with --tls-key)",
    )
    group.add_argument(
        "--tls-key",
        default="",
        metavar="FILE",
        help="mTLS: the client certificate's private key, an unencrypted PEM file",
    )
    group.add_argument(
        "--api-key",
        default="",
        metavar="KEY",
        help='send "authorization: Bearer KEY" metadata on every call',
    )


def from_args(args: argparse.Namespace) -> ClientCredentials:
    return ClientCredentials(args.tls_ca, args.tls_cert, args.tls_key, args.api_key)
