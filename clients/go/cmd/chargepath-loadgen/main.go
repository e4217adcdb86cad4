// Command chargepath-loadgen is the native load generator for unary Check calls, an optional
// back end of the Python load generator (python -m loadtest ... --generator go). One Python
// worker process starts one chargepath-loadgen and drives it over stdin/stdout for the whole
// measurement, so its connections stay warm from phase to phase (warm-up, run, find-max steps).
// The Python side (loadtest/gogen.py) records what it reports exactly as it records its own
// calls: this program only sends the calls and times them.
//
// Start-up: the flags give the target, the number of connections (each its own ClientConn, so
// its own TCP connection), TLS (--tls-ca, --tls-cert/--tls-key, as the example's; plaintext
// without them) and what to put in every request. The Python side sends the API key in each
// phase's METADATA rather than as --api-key, which would show on the command line. Once every connection is ready it
// prints "ready"; if one is not within 10 s it prints the reason on stderr and exits 1.
//
// Protocol: one command per line on stdin, one event per line on stdout, fields separated by
// single spaces.
//
// Commands:
//
//	phase INDEX START_NS RATE DURATION_S WORKER WORKERS DRAIN_S MAX_IN_FLIGHT DEADLINE_S VIEW METADATA
//	quit                      (or end of input) close the connections and exit 0
//
// START_NS is the phase's start in Unix nanoseconds (wall clock). RATE is the flow's arrivals
// per second, all workers together, DURATION_S the phase's length: arrival k = 0, 1, ... is due
// at START + k/RATE for every k with k/RATE < DURATION_S, and this process owns the arrivals
// with k % WORKERS == WORKER, numbered I = 0, 1, ... (k = I*WORKERS + WORKER), exactly as
// loadtest/schedule.py. An arrival fires when due, or at once if the schedule is late; its
// latency is always measured from its intended time. With MAX_IN_FLIGHT calls outstanding, an
// arrival is dropped. DEADLINE_S is each call's deadline, VIEW a chargepath.v1.VerdictView
// name, METADATA "-" or the call metadata URL-query-encoded (k1=v1&k2=v2). After the schedule,
// the phase waits up to DRAIN_S for the calls in flight, then cancels the rest.
//
// Events of a phase, in this order for any one arrival:
//
//	s I                              arrival I sent
//	d I                              arrival I dropped (MAX_IN_FLIGHT calls outstanding)
//	a I LATENCY_US DECISION DEGRADED arrival I answered: the verdict's Decision number, 1 if degraded else 0
//	e I LATENCY_US CODE [DETAIL]     arrival I failed with this gRPC status code name, or
//	                                 REQUEST_ID_MISMATCH if the verdict answers another request;
//	                                 the detail (first per code and phase only) runs to the
//	                                 line's end
//	end INDEX                        every arrival has been sent or dropped
//	i N                              N calls unanswered at the end of the drain, cancelled
//	done INDEX                       the phase is over; the next command is read
//
// LATENCY_US is from the arrival's intended time to the answer, in whole microseconds.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"math"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	chargepathv1 "github.com/chargepath/chargepath/clients/go/gen/chargepath/v1"
	"github.com/chargepath/chargepath/clients/go/internal/clientcreds"
	"github.com/chargepath/chargepath/clients/go/internal/grpccode"
)

const (
	program     = "chargepath-loadgen"
	dialTimeout = 10 * time.Second
	flushEvery  = 20 * time.Millisecond
	// Rounding slack for duration*rate products that should be whole numbers (as schedule.py).
	epsilon = 1e-9
	// The error code of an answer whose verdict carries another request id (as drivers.py).
	mismatchCode = "REQUEST_ID_MISMATCH"
)

// requests builds the Check requests, as loadtest/workload.py CheckRequests does: the n-th call
// (counted across phases) has request id PREFIX-n and key key-NNNNN of n % keys, or the one hot key.
type requests struct {
	idPrefix string
	tenant   string
	metric   string
	amount   int64
	keys     int64
	hotKey   string
	n        int64
}

func (r *requests) next(view chargepathv1.VerdictView) *chargepathv1.CheckRequest {
	n := r.n
	r.n++
	key := r.hotKey
	if key == "" {
		key = fmt.Sprintf("key-%05d", n%r.keys)
	}
	return &chargepathv1.CheckRequest{
		Usage: &chargepathv1.Usage{
			RequestId: r.idPrefix + "-" + strconv.FormatInt(n, 10),
			Subject:   &chargepathv1.Subject{Tenant: r.tenant, Key: key},
			Metric:    r.metric,
			Amount:    r.amount,
			Mode:      chargepathv1.Mode_MODE_ADMIT,
		},
		View: view,
	}
}

// phase is one parsed phase command.
type phase struct {
	index       int64
	start       time.Time // carries a monotonic reading: sleeps and latencies ignore wall-clock steps
	rate        float64
	duration    float64
	worker      int64
	workers     int64
	drain       time.Duration
	maxInFlight int64
	deadline    time.Duration
	view        chargepathv1.VerdictView
	md          metadata.MD
}

// total is the number of arrivals this process owns (schedule.py: Schedule.total).
func (p *phase) total() int64 {
	flowTotal := int64(math.Max(0, math.Ceil(p.duration*p.rate-epsilon)))
	if flowTotal <= p.worker {
		return 0
	}
	return (flowTotal - p.worker + p.workers - 1) / p.workers
}

// intended is the due time of this process's arrival i (schedule.py: Schedule.time_of).
func (p *phase) intended(i int64) time.Time {
	k := float64(i*p.workers + p.worker)
	return p.start.Add(time.Duration(k / p.rate * float64(time.Second)))
}

// event is one output line; the writer goroutine formats it.
type event struct {
	kind     string // s, d, a, e, end, i, done
	n        int64  // the arrival (s d a e), the phase (end done) or the count (i)
	latency  time.Duration
	decision int32
	degraded bool
	code     string
	detail   string
}

func (ev *event) appendTo(b []byte) []byte {
	b = append(b, ev.kind...)
	b = append(b, ' ')
	b = strconv.AppendInt(b, ev.n, 10)
	switch ev.kind {
	case "a":
		b = append(b, ' ')
		b = strconv.AppendInt(b, ev.latency.Microseconds(), 10)
		b = append(b, ' ')
		b = strconv.AppendInt(b, int64(ev.decision), 10)
		if ev.degraded {
			b = append(b, " 1"...)
		} else {
			b = append(b, " 0"...)
		}
	case "e":
		b = append(b, ' ')
		b = strconv.AppendInt(b, ev.latency.Microseconds(), 10)
		b = append(b, ' ')
		b = append(b, ev.code...)
		if ev.detail != "" {
			b = append(b, ' ')
			b = append(b, strings.Join(strings.Fields(ev.detail), " ")...) // one line
		}
	}
	return append(b, '\n')
}

// writeEvents writes every event to stdout. Lines are flushed every flushEvery, and at once
// after end, i and done: each write wakes the Python worker up, so fewer writes cost it less
// CPU, and the latencies in the lines do not depend on when they are read.
func writeEvents(events <-chan event, finished chan<- struct{}) {
	w := bufio.NewWriterSize(os.Stdout, 64<<10)
	flush := func() {
		if err := w.Flush(); err != nil {
			fatalf("writing to stdout: %v", err)
		}
	}
	ticker := time.NewTicker(flushEvery)
	defer ticker.Stop()
	var line []byte
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				flush()
				close(finished)
				return
			}
			line = ev.appendTo(line[:0])
			if _, err := w.Write(line); err != nil {
				fatalf("writing to stdout: %v", err)
			}
			if ev.kind != "s" && ev.kind != "d" && ev.kind != "a" && ev.kind != "e" {
				flush()
			}
		case <-ticker.C:
			if w.Buffered() > 0 {
				flush()
			}
		}
	}
}

type generator struct {
	clients []chargepathv1.MeteringServiceClient
	reqs    requests
	events  chan<- event
}

// run plays one phase: the schedule, then the drain, then the cancellation of what is left.
func (g *generator) run(p *phase) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if len(p.md) > 0 {
		ctx = metadata.NewOutgoingContext(ctx, p.md)
	}
	var (
		inFlight   atomic.Int64
		abandoned  atomic.Bool
		incomplete atomic.Int64
		wg         sync.WaitGroup
		detailsMu  sync.Mutex
		details    = map[string]bool{} // codes whose detail was already reported this phase
	)
	call := func(i int64, intended time.Time, client chargepathv1.MeteringServiceClient, req *chargepathv1.CheckRequest) {
		defer wg.Done()
		callCtx, callCancel := context.WithTimeout(ctx, p.deadline)
		resp, err := client.Check(callCtx, req)
		callCancel()
		latency := time.Since(intended)
		if abandoned.Load() { // cancelled, or answered only after the drain: not counted
			incomplete.Add(1)
			return
		}
		if err != nil {
			st := status.Convert(err)
			code := grpccode.Name(st.Code())
			detailsMu.Lock()
			detail := ""
			if !details[code] {
				details[code] = true
				detail = st.Message()
			}
			detailsMu.Unlock()
			g.events <- event{kind: "e", n: i, latency: latency, code: code, detail: detail}
		} else if v := resp.GetVerdict(); v.GetRequestId() != req.GetUsage().GetRequestId() {
			// an answer to another call: the target is broken, and this is no decision
			detail := fmt.Sprintf("sent %q, answered %q", req.GetUsage().GetRequestId(), v.GetRequestId())
			g.events <- event{kind: "e", n: i, latency: latency, code: mismatchCode, detail: detail}
		} else {
			g.events <- event{kind: "a", n: i, latency: latency, decision: int32(v.GetDecision()), degraded: v.GetDegraded()}
		}
		inFlight.Add(-1)
	}

	total := p.total()
	for i := int64(0); i < total; i++ {
		intended := p.intended(i)
		if wait := time.Until(intended); wait > 0 {
			time.Sleep(wait)
		}
		if inFlight.Load() >= p.maxInFlight {
			g.events <- event{kind: "d", n: i}
			continue
		}
		inFlight.Add(1)
		client := g.clients[g.reqs.n%int64(len(g.clients))]
		req := g.reqs.next(p.view)
		// Sent before the call starts: its result always comes after this line.
		g.events <- event{kind: "s", n: i}
		wg.Add(1)
		go call(i, intended, client, req)
	}
	g.events <- event{kind: "end", n: p.index}

	settled := make(chan struct{})
	go func() {
		wg.Wait()
		close(settled)
	}()
	timer := time.NewTimer(p.drain)
	select {
	case <-settled:
	case <-timer.C:
	}
	timer.Stop()
	abandoned.Store(true)
	cancel()
	<-settled
	g.events <- event{kind: "i", n: incomplete.Load()}
	g.events <- event{kind: "done", n: p.index}
}

// parsePhase parses the fields of a phase command (after the word "phase").
func parsePhase(fields []string) (*phase, error) {
	const want = 11
	if len(fields) != want {
		return nil, fmt.Errorf("phase: want %d fields, got %d", want, len(fields))
	}
	ints := make([]int64, 0, 5)
	floats := make([]float64, 0, 4)
	for _, f := range []struct {
		name  string
		text  string
		float bool
	}{
		{"INDEX", fields[0], false}, {"START_NS", fields[1], false}, {"RATE", fields[2], true},
		{"DURATION_S", fields[3], true}, {"WORKER", fields[4], false}, {"WORKERS", fields[5], false},
		{"DRAIN_S", fields[6], true}, {"MAX_IN_FLIGHT", fields[7], false}, {"DEADLINE_S", fields[8], true},
	} {
		if f.float {
			v, err := strconv.ParseFloat(f.text, 64)
			if err != nil || math.IsNaN(v) || math.IsInf(v, 0) || v < 0 {
				return nil, fmt.Errorf("phase: %s: not a finite number >= 0: %q", f.name, f.text)
			}
			floats = append(floats, v)
		} else {
			v, err := strconv.ParseInt(f.text, 10, 64)
			if err != nil {
				return nil, fmt.Errorf("phase: %s: not an integer: %q", f.name, f.text)
			}
			ints = append(ints, v)
		}
	}
	p := &phase{
		index:       ints[0],
		rate:        floats[0],
		duration:    floats[1],
		worker:      ints[2],
		workers:     ints[3],
		drain:       time.Duration(floats[2] * float64(time.Second)),
		maxInFlight: ints[4],
		deadline:    time.Duration(floats[3] * float64(time.Second)),
	}
	// The same instant on the monotonic clock: time.Now() carries one, time.Unix does not.
	now := time.Now()
	p.start = now.Add(time.Duration(ints[1] - now.UnixNano()))
	switch {
	case p.rate <= 0:
		return nil, fmt.Errorf("phase: RATE must be positive, got %v", p.rate)
	case p.workers < 1 || p.worker < 0 || p.worker >= p.workers:
		return nil, fmt.Errorf("phase: worker %d is not one of %d workers", p.worker, p.workers)
	case p.maxInFlight < 1:
		return nil, fmt.Errorf("phase: MAX_IN_FLIGHT must be at least 1, got %d", p.maxInFlight)
	case p.deadline <= 0:
		return nil, fmt.Errorf("phase: DEADLINE_S must be positive")
	}
	view, ok := chargepathv1.VerdictView_value[fields[9]]
	if !ok {
		return nil, fmt.Errorf("phase: VIEW: no VerdictView %q", fields[9])
	}
	p.view = chargepathv1.VerdictView(view)
	if fields[10] != "-" {
		query, err := url.ParseQuery(fields[10])
		if err != nil {
			return nil, fmt.Errorf("phase: METADATA: %v", err)
		}
		p.md = metadata.MD{}
		for k, vs := range query {
			p.md.Append(k, vs...)
		}
	}
	return p, nil
}

func dial(target string, connections int, creds *clientcreds.Flags) ([]*grpc.ClientConn, error) {
	dialOpts, err := creds.DialOptions()
	if err != nil {
		return nil, err
	}
	dialOpts = append(dialOpts, grpc.WithBlock())
	if creds.TLS() {
		// grpc-go retries a failed TLS handshake until the timeout; this says why it failed
		// (e.g. "x509: certificate signed by unknown authority") instead of only timing out.
		dialOpts = append(dialOpts, grpc.WithReturnConnectionError())
	}
	ctx, cancel := context.WithTimeout(context.Background(), dialTimeout)
	defer cancel()
	conns := make([]*grpc.ClientConn, 0, connections)
	for c := 0; c < connections; c++ {
		// Plaintext or TLS as the Python generator's. Every Dial is its own ClientConn and TCP
		// connection.
		conn, err := grpc.DialContext(ctx, target, dialOpts...)
		if err != nil {
			for _, open := range conns {
				open.Close()
			}
			return nil, fmt.Errorf("no gRPC server answers at %s (connection %d of %d, waited %v): %v",
				target, c+1, connections, dialTimeout, err)
		}
		conns = append(conns, conn)
	}
	return conns, nil
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s: "+format+"\n", append([]any{program}, args...)...)
	os.Exit(1)
}

func main() {
	fs := flag.NewFlagSet(program, flag.ExitOnError)
	target := fs.String("target", "127.0.0.1:50051", "gRPC target, HOST:PORT (plaintext unless a --tls-* flag is given)")
	connections := fs.Int("connections", 2, "gRPC connections (each its own TCP connection)")
	idPrefix := fs.String("id-prefix", "", "request ids are PREFIX-n, n counting every call sent (required)")
	tenant := fs.String("tenant", "cpaas-demo", "the subject's tenant")
	metric := fs.String("metric", "api.sms.send", "the usage's metric")
	amount := fs.Int64("amount", 1, "the usage's amount")
	keys := fs.Int64("keys", 1000, "call n goes to key key-NNNNN of n % keys")
	hotKey := fs.String("hot-key", "", "every call goes to this key (overrides --keys)")
	var creds clientcreds.Flags
	creds.Register(fs)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: %s --target HOST:PORT --id-prefix PREFIX [flags]\n"+
			"Driven over stdin/stdout by loadtest/gogen.py; the protocol is in this program's source.\n", program)
		fs.PrintDefaults()
	}
	_ = fs.Parse(os.Args[1:]) // ExitOnError: exits 2 on a bad flag
	switch {
	case fs.NArg() > 0:
		fatalf("unexpected argument %q", fs.Arg(0))
	case *connections < 1:
		fatalf("--connections must be at least 1")
	case *idPrefix == "":
		fatalf("--id-prefix is required")
	case *keys < 1:
		fatalf("--keys must be at least 1")
	}

	conns, err := dial(*target, *connections, &creds)
	if err != nil {
		fatalf("%v", err)
	}
	events := make(chan event, 8192)
	finished := make(chan struct{})
	go writeEvents(events, finished)
	g := &generator{
		reqs:   requests{idPrefix: *idPrefix, tenant: *tenant, metric: *metric, amount: *amount, keys: *keys, hotKey: *hotKey},
		events: events,
	}
	for _, conn := range conns {
		g.clients = append(g.clients, chargepathv1.NewMeteringServiceClient(conn))
	}
	os.Stdout.WriteString("ready\n") // nothing else writes yet

	commands := bufio.NewScanner(os.Stdin)
	for commands.Scan() {
		fields := strings.Fields(commands.Text())
		if len(fields) == 0 {
			continue
		}
		if fields[0] == "quit" {
			break
		}
		if fields[0] != "phase" {
			fatalf("unknown command %q", fields[0])
		}
		p, err := parsePhase(fields[1:])
		if err != nil {
			fatalf("%v", err)
		}
		g.run(p)
	}
	if err := commands.Err(); err != nil {
		fatalf("reading stdin: %v", err)
	}
	close(events)
	<-finished
	for _, conn := range conns {
		conn.Close()
	}
}
