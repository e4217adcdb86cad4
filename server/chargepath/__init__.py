"""Chargepath: a metering and entitlement gateway for 5G network slices and CPaaS APIs.

Layout (one job per package, wired together in :mod:`chargepath.app`):

- :mod:`chargepath.core`: the pure domain (usages, verdicts, plans, validation, periods). No grpc,
  no redis, no generated code, no file I/O, nothing of chargepath outside it.
- :mod:`chargepath.store`: the store contracts (:mod:`chargepath.store.base`, no redis) and their
  Redis implementation (Lua scripts shipped as package data) plus the embedded redis-server
  launcher.
- :mod:`chargepath.engine`: turns usages into verdicts with a store, a policy and a failure policy;
  no grpc, no redis (it takes the store contracts and the grpc-free :mod:`chargepath.telemetry`).
- :mod:`chargepath.transport`: the gRPC servicers, their tracing, and the one module mapping
  protobuf to core types; it reaches the store through its contracts only.
- :mod:`chargepath.policy_files`: reads plan files for the core to parse.

``tests/unit/test_import_boundaries.py`` checks these import rules.
- :mod:`chargepath_protos.v1` (shipped with the client, `clients/python`): code generated from
  ``protos/``; never edited by hand.
"""

__version__ = "0.1.0"
