"""The gRPC transport: servicers, and the one module that maps protobuf to core types."""
