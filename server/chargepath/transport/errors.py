"""gRPC errors with a machine-readable detail and no leaked exception text."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from chargepath.core.model import FieldViolation


async def abort_invalid(context: Any, violations: list[FieldViolation]) -> NoReturn:
    """INVALID_ARGUMENT naming every bad field, with a google.rpc.BadRequest detail."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.reason)
                for v in violations
            ]
        )
    )
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message="; ".join(str(v) for v in violations),
        details=[detail],
    )
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")


async def abort(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with ``code``; ``message`` must hold no exception text or secret."""
    await context.abort(code, message)
    raise AssertionError("abort returned")
