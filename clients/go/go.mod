module github.com/chargepath/chargepath/clients/go

// The versions are those of Debian 12's packages, which scripts/setup-go.sh builds against
// (the project's machines have no Go module proxy): keep them in step with EXPECTED_VERSION
// there. The stubs in gen/ come from protoc-gen-go v1.28.1 and protoc-gen-go-grpc 1.0
// (Debian's, from grpc-go v1.33.3).
go 1.19

require (
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)
