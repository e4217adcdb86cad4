// Command chargepath-example drives a Chargepath gateway through the Go stubs generated
// from protos/chargepath/v1 (run scripts/setup-go.sh to generate them and build this).
//
// It makes the Check calls and the StreamUsage session that a script file lists (or a
// built-in demo) and prints one JSON line per verdict on stdout. The Node.js example in
// clients/node behaves identically, flag for flag and line for line; an end-to-end test
// (tests/e2e/test_interop.py) compares the two.
//
// Exit status: 0 when every call succeeded, 1 when an RPC failed (the gRPC status code and
// details are printed on stderr), 2 for a bad command line or script file.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/durationpb"

	chargepathv1 "github.com/chargepath/chargepath/clients/go/gen/chargepath/v1"
	"github.com/chargepath/chargepath/clients/go/internal/clientcreds"
	"github.com/chargepath/chargepath/clients/go/internal/grpccode"
)

const program = "chargepath-example"

// options are the command-line flags. They have the same names, defaults and meaning as
// the Node.js example's.
type options struct {
	addr       string
	scriptPath string
	dropAfter  int
	deadline   time.Duration
	creds      clientcreds.Flags // --tls-ca, --tls-cert, --tls-key, --api-key
}

// workload is what to send: Check usages first, then one StreamUsage session whose batches
// go out one at a time (the next batch is sent once the previous one is answered, so the
// output is deterministic and a drop after N responses means exactly N batches were decided).
type workload struct {
	checks    []*chargepathv1.Usage
	sessionID string
	batches   [][]*chargepathv1.Usage
}

// scriptFile is the --script format. Each usage is a chargepath.v1.Usage in protobuf JSON
// form (field names in snake_case or lowerCamelCase, enums by name).
type scriptFile struct {
	Check  []json.RawMessage `json:"check"`
	Stream *struct {
		SessionID string              `json:"session_id"`
		Batches   [][]json.RawMessage `json:"batches"`
	} `json:"stream"`
}

// verdictLine is one line of output. The field order is part of the output format.
type verdictLine struct {
	RequestID     string `json:"request_id"`
	Decision      string `json:"decision"`
	Reason        string `json:"reason"`
	Replayed      bool   `json:"replayed"`
	Recorded      bool   `json:"recorded"`
	Degraded      bool   `json:"degraded"`
	PolicyVersion int64  `json:"policy_version"`
	DecisionID    string `json:"decision_id"`
	RetryAfterMs  int64  `json:"retry_after_ms"`
}

// usageError is a bad command line or script file (exit status 2).
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

// rpcError is a failed call (exit status 1).
type rpcError struct {
	call string
	err  error
}

func (e *rpcError) Error() string {
	st := status.Convert(e.err)
	return fmt.Sprintf("%s failed: %s: %s", e.call, grpccode.Name(st.Code()), st.Message())
}

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	opts, err := parseFlags(args)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", program, err)
		return 2
	}
	work, err := loadWorkload(opts.scriptPath)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", program, err)
		return 2
	}
	if err := execute(opts, work); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", program, err)
		var bad *usageError
		if errors.As(err, &bad) {
			return 2
		}
		return 1
	}
	return 0
}

func parseFlags(args []string) (options, error) {
	fs := flag.NewFlagSet(program, flag.ContinueOnError)
	fs.SetOutput(os.Stderr)
	addr := fs.String("addr", "127.0.0.1:50051", "gateway address, HOST:PORT")
	scriptPath := fs.String("script", "", "JSON script of Check usages and stream batches (default: built-in demo)")
	dropAfter := fs.Int("drop-after", 0, "cancel the stream after N responses, reconnect and resend every batch (0: never)")
	deadlineMs := fs.Int("deadline-ms", 5000, "deadline of each call (a whole stream is one call), in milliseconds")
	var creds clientcreds.Flags
	creds.Register(fs)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: %s [--addr HOST:PORT] [--script FILE] [--drop-after N] [--deadline-ms MS]\n"+
			"       [--tls-ca FILE] [--tls-cert FILE --tls-key FILE] [--api-key KEY]\n", program)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return options{}, err
	}
	if fs.NArg() > 0 {
		return options{}, &usageError{fmt.Sprintf("unexpected argument %q", fs.Arg(0))}
	}
	if *dropAfter < 0 {
		return options{}, &usageError{"--drop-after must be 0 or more"}
	}
	if *deadlineMs <= 0 {
		return options{}, &usageError{"--deadline-ms must be more than 0"}
	}
	if err := creds.Check(); err != nil {
		return options{}, &usageError{err.Error()}
	}
	return options{
		addr:       *addr,
		scriptPath: *scriptPath,
		dropAfter:  *dropAfter,
		deadline:   time.Duration(*deadlineMs) * time.Millisecond,
		creds:      creds,
	}, nil
}

func loadWorkload(path string) (workload, error) {
	if path == "" {
		return demoWorkload(), nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return workload{}, &usageError{fmt.Sprintf("cannot read script: %v", err)}
	}
	var file scriptFile
	if err := json.Unmarshal(data, &file); err != nil {
		return workload{}, &usageError{fmt.Sprintf("%s: not a valid script: %v", path, err)}
	}
	var work workload
	for i, raw := range file.Check {
		usage, err := parseUsage(raw)
		if err != nil {
			return workload{}, &usageError{fmt.Sprintf("%s: check[%d]: %v", path, i, err)}
		}
		work.checks = append(work.checks, usage)
	}
	if file.Stream != nil {
		work.sessionID = file.Stream.SessionID
		for b, batch := range file.Stream.Batches {
			usages := make([]*chargepathv1.Usage, 0, len(batch))
			for i, raw := range batch {
				usage, err := parseUsage(raw)
				if err != nil {
					return workload{}, &usageError{fmt.Sprintf("%s: stream.batches[%d][%d]: %v", path, b, i, err)}
				}
				if usage.SessionId != "" && usage.SessionId != work.sessionID {
					return workload{}, &usageError{fmt.Sprintf(
						"%s: stream.batches[%d][%d]: session_id %q differs from the stream's session_id %q",
						path, b, i, usage.SessionId, work.sessionID)}
				}
				usage.SessionId = work.sessionID
				usages = append(usages, usage)
			}
			work.batches = append(work.batches, usages)
		}
	}
	return work, nil
}

func parseUsage(raw json.RawMessage) (*chargepathv1.Usage, error) {
	usage := &chargepathv1.Usage{}
	if err := protojson.Unmarshal(raw, usage); err != nil {
		return nil, err
	}
	return usage, nil
}

// demoWorkload is the built-in demo: one admit for the CPaaS tenant, then a report stream
// of two batches of three for a slice of the MVNO tenant, under a fresh session.
func demoWorkload() workload {
	check := &chargepathv1.Usage{
		RequestId: newUUID(),
		Subject:   &chargepathv1.Subject{Tenant: "cpaas-demo", Key: "key-1"},
		Metric:    "api.sms.send",
		Amount:    1,
		Mode:      chargepathv1.Mode_MODE_ADMIT,
	}
	sessionID := newUUID()
	var batches [][]*chargepathv1.Usage
	seq := uint64(0)
	for b := 0; b < 2; b++ {
		var batch []*chargepathv1.Usage
		for i := 0; i < 3; i++ {
			seq++
			batch = append(batch, &chargepathv1.Usage{
				RequestId: fmt.Sprintf("%s-%d", sessionID, seq),
				Subject:   &chargepathv1.Subject{Tenant: "mvno-demo", Slice: "1-000001"},
				Metric:    "slice.bytes",
				Amount:    1000000,
				Mode:      chargepathv1.Mode_MODE_REPORT,
				SessionId: sessionID,
				Sequence:  seq,
			})
		}
		batches = append(batches, batch)
	}
	return workload{checks: []*chargepathv1.Usage{check}, sessionID: sessionID, batches: batches}
}

func execute(opts options, work workload) error {
	// Plaintext unless a --tls-* flag is given. grpc.Dial connects lazily: an unreachable
	// gateway, or a failed TLS handshake, shows up as UNAVAILABLE on the call.
	dialOpts, err := opts.creds.DialOptions()
	if err != nil {
		return &usageError{err.Error()}
	}
	conn, err := grpc.Dial(opts.addr, dialOpts...)
	if err != nil {
		return &usageError{fmt.Sprintf("bad --addr %q: %v", opts.addr, err)}
	}
	defer conn.Close()
	client := chargepathv1.NewMeteringServiceClient(conn)
	out := json.NewEncoder(os.Stdout)
	out.SetEscapeHTML(false)

	for _, usage := range work.checks {
		verdict, err := check(client, opts.deadline, usage)
		if err != nil {
			return err
		}
		if err := printVerdict(out, verdict); err != nil {
			return err
		}
	}
	if len(work.batches) == 0 {
		return nil
	}
	dropped, err := streamOnce(client, opts.deadline, work.batches, opts.dropAfter, out)
	if err != nil || !dropped {
		if err == nil && opts.dropAfter > 0 {
			fmt.Fprintf(os.Stderr, "%s: --drop-after %d: the stream ended after %d responses; nothing was dropped\n",
				program, opts.dropAfter, len(work.batches))
		}
		return err
	}
	fmt.Fprintf(os.Stderr, "%s: cancelled the stream after %d responses; reconnecting and resending all %d batches of session %q\n",
		program, opts.dropAfter, len(work.batches), work.sessionID)
	_, err = streamOnce(client, opts.deadline, work.batches, 0, out)
	return err
}

func check(client chargepathv1.MeteringServiceClient, deadline time.Duration, usage *chargepathv1.Usage) (*chargepathv1.Verdict, error) {
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	resp, err := client.Check(ctx, &chargepathv1.CheckRequest{Usage: usage})
	if err != nil {
		return nil, &rpcError{call: "Check", err: err}
	}
	if resp.GetVerdict() == nil {
		return nil, fmt.Errorf("Check: the response has no verdict")
	}
	return resp.GetVerdict(), nil
}

// streamOnce sends the batches over one StreamUsage call, one batch in flight at a time, and
// prints their verdicts. With dropAfter > 0 it cancels the call once it has received
// dropAfter responses and reports dropped = true.
func streamOnce(client chargepathv1.MeteringServiceClient, deadline time.Duration, batches [][]*chargepathv1.Usage,
	dropAfter int, out *json.Encoder) (dropped bool, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	stream, err := client.StreamUsage(ctx)
	if err != nil {
		return false, &rpcError{call: "StreamUsage", err: err}
	}
	for i, batch := range batches {
		if err := stream.Send(&chargepathv1.StreamUsageRequest{Usages: batch}); err != nil {
			if err == io.EOF {
				// The server ended the call: its status comes with the next receive.
				_, err = stream.Recv()
			}
			return false, streamError(err, i)
		}
		resp, err := stream.Recv()
		if err != nil {
			return false, streamError(err, i)
		}
		if len(resp.GetVerdicts()) != len(batch) {
			return false, fmt.Errorf("StreamUsage: batch %d of %d usages got %d verdicts", i, len(batch), len(resp.GetVerdicts()))
		}
		for _, verdict := range resp.GetVerdicts() {
			if err := printVerdict(out, verdict); err != nil {
				return false, err
			}
		}
		if dropAfter > 0 && i+1 == dropAfter {
			cancel() // Drop the call as a crashed or disconnected client would.
			return true, nil
		}
	}
	if err := stream.CloseSend(); err != nil {
		return false, &rpcError{call: "StreamUsage", err: err}
	}
	if _, err := stream.Recv(); err != io.EOF {
		if err == nil {
			return false, fmt.Errorf("StreamUsage: the server sent a response after the last batch's")
		}
		return false, &rpcError{call: "StreamUsage", err: err}
	}
	return false, nil
}

func streamError(err error, batch int) error {
	if err == io.EOF {
		return fmt.Errorf("StreamUsage: the server ended the stream without answering batch %d", batch)
	}
	return &rpcError{call: "StreamUsage", err: err}
}

func printVerdict(out *json.Encoder, v *chargepathv1.Verdict) error {
	if msg := v.GetMessage(); msg != "" {
		fmt.Fprintf(os.Stderr, "%s: %s: %s\n", program, v.GetRequestId(), msg)
	}
	return out.Encode(verdictLine{
		RequestID:     v.GetRequestId(),
		Decision:      enumName(v.GetDecision()),
		Reason:        enumName(v.GetReason()),
		Replayed:      v.GetReplayed(),
		Recorded:      v.GetRecorded(),
		Degraded:      v.GetDegraded(),
		PolicyVersion: v.GetPolicyVersion(),
		DecisionID:    v.GetDecisionId(),
		RetryAfterMs:  ceilMillis(v.GetRetryAfter()),
	})
}

// enumName is the value's name in the proto, or its number for a value this build does not know.
func enumName(e protoreflect.Enum) string {
	if value := e.Descriptor().Values().ByNumber(e.Number()); value != nil {
		return string(value.Name())
	}
	return strconv.Itoa(int(e.Number()))
}

// ceilMillis rounds a duration up to whole milliseconds: a client that waits retry_after_ms
// never comes back too early.
func ceilMillis(d *durationpb.Duration) int64 {
	if d == nil {
		return 0
	}
	ms := d.GetSeconds() * 1000
	nanos := int64(d.GetNanos())
	ms += nanos / 1e6
	if nanos%1e6 > 0 {
		ms++
	}
	return ms
}

// newUUID is a random (version 4) UUID, for request and session ids.
func newUUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("crypto/rand: %v", err))
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}
