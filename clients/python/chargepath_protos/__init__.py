# Code generated from protos/chargepath/v1 by scripts/gen-python.sh. DO NOT EDIT.
"""Protobuf and gRPC stubs of chargepath.v1, generated from protos/."""
