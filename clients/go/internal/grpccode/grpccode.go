// Package grpccode names gRPC status codes the way the gRPC spec and every other language's
// runtime do (DEADLINE_EXCEEDED, not grpc-go's DeadlineExceeded), so that what the Go programs
// print matches the Python load generator's reports and the other clients' errors.
package grpccode

import (
	"strconv"

	"google.golang.org/grpc/codes"
)

var names = map[codes.Code]string{
	codes.OK:                 "OK",
	codes.Canceled:           "CANCELLED",
	codes.Unknown:            "UNKNOWN",
	codes.InvalidArgument:    "INVALID_ARGUMENT",
	codes.DeadlineExceeded:   "DEADLINE_EXCEEDED",
	codes.NotFound:           "NOT_FOUND",
	codes.AlreadyExists:      "ALREADY_EXISTS",
	codes.PermissionDenied:   "PERMISSION_DENIED",
	codes.ResourceExhausted:  "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION",
	codes.Aborted:            "ABORTED",
	codes.OutOfRange:         "OUT_OF_RANGE",
	codes.Unimplemented:      "UNIMPLEMENTED",
	codes.Internal:           "INTERNAL",
	codes.Unavailable:        "UNAVAILABLE",
	codes.DataLoss:           "DATA_LOSS",
	codes.Unauthenticated:    "UNAUTHENTICATED",
}

// Name is the canonical upper-case name of c, or CODE_N for a code the spec does not name.
func Name(c codes.Code) string {
	if name, ok := names[c]; ok {
		return name
	}
	return "CODE_" + strconv.Itoa(int(c))
}
