"""Chargepath: a metering and entitlement gateway for 5G network slices and CPaaS APIs.

Layout (one job per package, wired together in :mod:`chargepath.app`):

- :mod:`chargepath.core`: the pure domain (usages, verdicts, plans, validation, periods). No grpc,
  no redis, no generated code.
- :mod:`chargepath.store`: the store contract and its Redis implementation (Lua scripts shipped
  as package data) plus the embedded redis-server launcher.
- :mod:`chargepath.engine`: turns usages into verdicts with a store, a policy and a failure policy.
- :mod:`chargepath.transport`: the gRPC servicers and the one module mapping protobuf to core types.
- :mod:`chargepath_protos.v1` (shipped with the client, `clients/python`): code generated from
  ``protos/``; never edited by hand.
"""

__version__ = "0.1.0"
