// Command chargepath-lease-example holds a quota lease on a Chargepath gateway through the
// Go stubs generated from protos/chargepath/v1/lease.proto (scripts/setup-go.sh generates
// them and builds this).
//
// It opens a lease (LeaseService.Lease, no lease_id), spends --spend units locally one at a
// time (a local decision: no call), renews the lease when what is available falls to the
// gateway's renewal threshold (reporting the units used since the last report, with a fresh
// request id), and releases it at the end (reporting the rest: the units not spent go back to
// the limits). A failed ask is sent again with the same request id: the gateway answers a
// repeat from its record and counts nothing twice.
//
// It prints one JSON line per answer, then a summary line. The Node.js example
// (clients/node/lease-example.ts) behaves identically, flag for flag and line for line;
// tests/e2e/test_lease_examples.py runs both against a gateway and checks the ledger.
//
// Exit status: 0 when every call succeeded (a THROTTLE or DENY is an answer, not a failure),
// 1 when an RPC failed (the gRPC status code and details on stderr), 2 for a bad command line.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	chargepathv1 "github.com/chargepath/chargepath/clients/go/gen/chargepath/v1"
	"github.com/chargepath/chargepath/clients/go/internal/clientcreds"
	"github.com/chargepath/chargepath/clients/go/internal/grpccode"
)

const (
	program = "chargepath-lease-example"
	// attempts per ask: a transient failure (UNAVAILABLE, DEADLINE_EXCEEDED) is retried with
	// the same request id.
	attempts = 3
	backoff  = 200 * time.Millisecond
)

type options struct {
	addr     string
	subject  *chargepathv1.Subject
	metric   string
	units    int64
	spend    int64
	holder   string
	deadline time.Duration
	creds    clientcreds.Flags
}

// answerLine is one line of output per answer. The field order is part of the output format.
type answerLine struct {
	Ask        string `json:"ask"`
	RequestID  string `json:"request_id"`
	LeaseID    string `json:"lease_id"`
	Decision   string `json:"decision"`
	Reason     string `json:"reason"`
	Requested  int64  `json:"requested"`
	Used       int64  `json:"used"`
	Granted    int64  `json:"granted"`
	Available  int64  `json:"available"`
	RenewBelow int64  `json:"renew_below"`
	FinalUnits bool   `json:"final_units"`
	Recorded   int64  `json:"recorded"`
	Overage    int64  `json:"overage"`
	Refunded   int64  `json:"refunded"`
	Closed     bool   `json:"closed"`
	Replayed   bool   `json:"replayed"`
	ValidForMs int64  `json:"valid_for_ms"`
}

// summaryLine is the last line: units spent locally, units reported, local refusals.
type summaryLine struct {
	Ask      string `json:"ask"`
	LeaseID  string `json:"lease_id"`
	Spent    int64  `json:"spent"`
	Reported int64  `json:"reported"`
	Refused  int64  `json:"refused"`
}

type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

type rpcError struct{ err error }

func (e *rpcError) Error() string {
	st := status.Convert(e.err)
	return fmt.Sprintf("Lease failed: %s: %s", grpccode.Name(st.Code()), st.Message())
}

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	opts, err := parseFlags(args)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err == nil {
		err = execute(opts)
	}
	if err != nil {
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
	tenant := fs.String("tenant", "cpaas-demo", "tenant")
	slice := fs.String("slice", "", "slice (none)")
	key := fs.String("key", "", "key (none)")
	metric := fs.String("metric", "api.sms.send", "metric")
	units := fs.Int64("units", 10, "units asked per grant")
	spend := fs.Int64("spend", 25, "units to spend locally, one at a time")
	holder := fs.String("holder", "", "who holds the lease (default: the caller's identity)")
	deadlineMs := fs.Int("deadline-ms", 5000, "deadline of each attempt, in milliseconds")
	var creds clientcreds.Flags
	creds.Register(fs)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: %s [--addr HOST:PORT] [--tenant T] [--slice S] [--key K] [--metric M]\n"+
			"       [--units N] [--spend N] [--holder H] [--deadline-ms MS]\n"+
			"       [--tls-ca FILE] [--tls-cert FILE --tls-key FILE] [--api-key KEY]\n", program)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return options{}, err
		}
		return options{}, &usageError{err.Error()}
	}
	if fs.NArg() > 0 {
		return options{}, &usageError{fmt.Sprintf("unexpected argument %q", fs.Arg(0))}
	}
	if *units < 1 || *units > 1_000_000_000_000 {
		return options{}, &usageError{"--units must be between 1 and 1000000000000"}
	}
	if *spend < 0 {
		return options{}, &usageError{"--spend must be 0 or more"}
	}
	if *deadlineMs <= 0 {
		return options{}, &usageError{"--deadline-ms must be more than 0"}
	}
	if err := creds.Check(); err != nil {
		return options{}, &usageError{err.Error()}
	}
	return options{
		addr:     *addr,
		subject:  &chargepathv1.Subject{Tenant: *tenant, Slice: *slice, Key: *key},
		metric:   *metric,
		units:    *units,
		spend:    *spend,
		holder:   *holder,
		deadline: time.Duration(*deadlineMs) * time.Millisecond,
		creds:    creds,
	}, nil
}

// holder is the lease as this program sees it: every level counts units since the start.
type holder struct {
	client     chargepathv1.LeaseServiceClient
	opts       options
	out        *json.Encoder
	leaseID    string
	spent      int64 // units allowed locally
	reported   int64 // units sent in a report
	limit      int64 // spent may reach this: reported + what the gateway says is available
	renewBelow int64
	final      bool
}

func execute(opts options) error {
	dialOpts, err := opts.creds.DialOptions()
	if err != nil {
		return &usageError{err.Error()}
	}
	conn, err := grpc.Dial(opts.addr, dialOpts...)
	if err != nil {
		return &usageError{fmt.Sprintf("bad --addr %q: %v", opts.addr, err)}
	}
	defer conn.Close()
	h := &holder{client: chargepathv1.NewLeaseServiceClient(conn), opts: opts, out: json.NewEncoder(os.Stdout)}

	if err := h.ask("open", opts.units, false); err != nil {
		return err
	}
	var refused int64
	for i := int64(0); i < opts.spend; i++ {
		if h.leaseID == "" {
			refused++
			continue
		}
		if h.spent+1 > h.limit && !h.final {
			// Nothing left and no renewal answered yet: ask now.
			if err := h.ask("renew", opts.units, false); err != nil {
				return err
			}
		}
		if h.spent+1 > h.limit || h.leaseID == "" {
			refused++ // a local refusal: the lease has nothing left
			continue
		}
		h.spent++ // the local decision: no call
		if h.limit-h.spent <= h.renewBelow && !h.final {
			if err := h.ask("renew", opts.units, false); err != nil {
				return err
			}
		}
	}
	leaseID := h.leaseID
	if h.leaseID != "" {
		if err := h.ask("release", 0, true); err != nil {
			return err
		}
	}
	return h.out.Encode(summaryLine{Ask: "summary", LeaseID: leaseID, Spent: h.spent, Reported: h.reported, Refused: refused})
}

// ask sends one ask (open when there is no lease yet, else a renewal or the release, with
// the units used since the last report), retrying a transient failure with the same
// request id, and takes in the answer.
func (h *holder) ask(kind string, requested int64, release bool) error {
	ask := &chargepathv1.LeaseAsk{
		RequestId: newUUID(),
		Subject:   h.opts.subject,
		Metric:    h.opts.metric,
		LeaseId:   h.leaseID,
		Requested: requested,
		Used:      h.spent - h.reported,
		Release:   release,
		Holder:    h.opts.holder,
	}
	var resp *chargepathv1.LeaseResponse
	var err error
	for attempt := 1; attempt <= attempts; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), h.opts.deadline)
		resp, err = h.client.Lease(ctx, &chargepathv1.LeaseRequest{Ask: ask})
		cancel()
		code := status.Code(err)
		if err == nil || (code != codes.Unavailable && code != codes.DeadlineExceeded) {
			break
		}
		time.Sleep(backoff * time.Duration(attempt))
	}
	if err != nil {
		return &rpcError{err}
	}
	a := resp.GetAnswer()
	h.reported += ask.Used
	line := answerLine{
		Ask:        kind,
		RequestID:  a.GetRequestId(),
		LeaseID:    a.GetLeaseId(),
		Decision:   a.GetDecision().String(),
		Reason:     a.GetReason().String(),
		Requested:  ask.Requested,
		Used:       ask.Used,
		Granted:    a.GetGranted(),
		Available:  a.GetAvailable(),
		RenewBelow: a.GetRenewBelow(),
		FinalUnits: a.GetFinalUnits(),
		Recorded:   a.GetRecorded(),
		Overage:    a.GetOverage(),
		Refunded:   a.GetRefunded(),
		Closed:     a.GetClosed(),
		Replayed:   a.GetReplayed(),
		ValidForMs: a.GetValidFor().AsDuration().Milliseconds(),
	}
	if msg := a.GetMessage(); msg != "" {
		fmt.Fprintf(os.Stderr, "%s: %s: %s\n", program, kind, msg)
	}
	switch {
	case a.GetClosed() || (kind == "open" && a.GetLeaseId() == ""):
		// released, expired, or never opened: nothing more may be spent under it
		h.leaseID = ""
		h.limit = h.spent
	default:
		h.leaseID = a.GetLeaseId()
		h.limit = h.reported + a.GetAvailable()
		if a.GetRenewBelow() > 0 {
			h.renewBelow = a.GetRenewBelow()
		}
		// A renewal that granted nothing (THROTTLE, DENY): spend what is left, ask no more.
		h.final = a.GetFinalUnits() || (requested > 0 && a.GetGranted() == 0)
	}
	return h.out.Encode(line)
}

// newUUID returns a random (version 4) UUID, as a request id.
func newUUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	b[6] = (b[6] & 0x0f) | 0x40
	b[8] = (b[8] & 0x3f) | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}
