"""xds-protos (Envoy's stubs) ships its own, older copies of the ``opentelemetry.proto`` and
``google.rpc``/``google.api`` modules, installed over those of opentelemetry-proto and
googleapis-common-protos: whichever installs last wins, and the old OpenTelemetry copy breaks
the OTLP exporter (it has no ``scope_spans``). ``make setup`` reinstalls the owners last; this
checks that it did, with the OTLP exporter and the Envoy stubs imported side by side."""

from __future__ import annotations

import base64
import hashlib
from importlib.metadata import distribution

import pytest

pytestmark = pytest.mark.unit

OWNERS = ("opentelemetry-proto", "googleapis-common-protos")


def _altered_files(dist_name: str) -> tuple[list[str], int]:
    """The files of ``dist_name`` whose content is not what its wheel installed (by the
    sha256 in its RECORD), and how many files were checked."""
    dist = distribution(dist_name)
    altered, checked = [], 0
    for f in dist.files or ():
        if f.hash is None or f.hash.mode != "sha256" or not str(f).endswith("_pb2.py"):
            continue
        digest = hashlib.sha256(f.locate().read_bytes()).digest()
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != f.hash.value:
            altered.append(str(f))
        checked += 1
    return altered, checked


@pytest.mark.parametrize("owner", OWNERS)
def test_proto_modules_are_their_owners_copies(owner: str) -> None:
    altered, checked = _altered_files(owner)
    assert checked > 5
    assert altered == [], f"{owner} files overwritten (by xds-protos?): run `make setup`"


def test_otlp_exporter_and_envoy_stubs_import_side_by_side() -> None:
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from envoy.service.rate_limit_quota.v3 import rlqs_pb2
    from envoy.service.ratelimit.v3 import rls_pb2
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.trace.v1 import trace_pb2
    from opentelemetry.sdk.trace import TracerProvider

    assert OTLPSpanExporter is not None
    assert {"domain", "descriptors", "hits_addend"} <= set(
        rls_pb2.RateLimitRequest.DESCRIPTOR.fields_by_name
    )
    assert "bucket_quota_usages" in rlqs_pb2.RateLimitQuotaUsageReports.DESCRIPTOR.fields_by_name
    assert "static_resources" in bootstrap_pb2.Bootstrap.DESCRIPTOR.fields_by_name
    # the module the exporter uses is opentelemetry-proto's, at the version it expects
    files = {str(f) for f in distribution("opentelemetry-proto").files or ()}
    assert "opentelemetry/proto/trace/v1/trace_pb2.py" in files
    assert trace_pb2.__file__.endswith("opentelemetry/proto/trace/v1/trace_pb2.py")
    assert "scope_spans" in trace_pb2.ResourceSpans.DESCRIPTOR.fields_by_name
    # and it encodes a real span (xds-protos's copy fails here)
    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span("s") as span:
        pass
    request = encode_spans([span])  # type: ignore[list-item]
    assert request.resource_spans[0].scope_spans[0].spans[0].name == "s"
