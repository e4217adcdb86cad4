// chargepath-lease-example for Node.js: holds a quota lease on a Chargepath gateway through
// the TypeScript stubs that ts-proto generates from protos/chargepath/v1/lease.proto into
// gen/ (scripts/setup-node.sh).
//
// It opens a lease (LeaseService.Lease, no lease_id), spends --spend units locally one at a
// time (a local decision: no call), renews the lease when what is available falls to the
// gateway's renewal threshold (reporting the units used since the last report, with a fresh
// request id), and releases it at the end (reporting the rest: the units not spent go back
// to the limits). A failed ask is sent again with the same request id: the gateway answers a
// repeat from its record and counts nothing twice.
//
// It prints one JSON line per answer, then a summary line. The Go example
// (clients/go/cmd/chargepath-lease-example) behaves identically, flag for flag and line for
// line; tests/e2e/test_lease_examples.py runs both against a gateway and checks the ledger.
//
// Exit status: 0 when every call succeeded (a THROTTLE or DENY is an answer, not a failure),
// 1 when an RPC failed (the gRPC status code and details on stderr), 2 for a bad command line.

import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import { type ChannelCredentials, credentials, Metadata, type ServiceError, status } from "@grpc/grpc-js";

import { type Duration } from "./gen/google/protobuf/duration";
import { LeaseAnswer, LeaseAsk, LeaseRequest, LeaseServiceClient } from "./gen/chargepath/v1/lease";
import { Decision, Reason } from "./gen/chargepath/v1/metering";

const PROGRAM = "chargepath-lease-example";
/** Attempts per ask: a transient failure (UNAVAILABLE, DEADLINE_EXCEEDED) is retried with the same request id. */
const ATTEMPTS = 3;
const BACKOFF_MS = 200;
const MAX_UNITS = 1_000_000_000_000;

interface Options {
  addr: string;
  tenant: string;
  slice: string;
  key: string;
  metric: string;
  units: number;
  spend: number;
  holder: string;
  deadlineMs: number;
  tlsCa: string;
  tlsCert: string;
  tlsKey: string;
  apiKey: string;
}

class UsageError extends Error {}

class RpcError extends Error {
  constructor(err: ServiceError) {
    super(`Lease failed: ${status[err.code] ?? String(err.code)}: ${err.details}`);
  }
}

const USAGE = `usage: ${PROGRAM} [--addr HOST:PORT] [--tenant T] [--slice S] [--key K] [--metric M]
       [--units N] [--spend N] [--holder H] [--deadline-ms MS]
       [--tls-ca FILE] [--tls-cert FILE --tls-key FILE] [--api-key KEY]
  --addr HOST:PORT    gateway address (default "127.0.0.1:50051")
  --tenant T          tenant (default "cpaas-demo")
  --slice S           slice (none)
  --key K             key (none)
  --metric M          metric (default "api.sms.send")
  --units N           units asked per grant (default 10)
  --spend N           units to spend locally, one at a time (default 25)
  --holder H          who holds the lease (default: the caller's identity)
  --deadline-ms MS    deadline of each attempt, in milliseconds (default 5000)
  --tls-ca FILE       TLS: trust the CA certificates in this PEM file (default: plaintext)
  --tls-cert FILE     mTLS: the client certificate chain, a PEM file (with --tls-key)
  --tls-key FILE      mTLS: the client certificate's private key, an unencrypted PEM file (with --tls-cert)
  --api-key KEY       send "authorization: Bearer KEY" metadata on every call`;

function parseIntFlag(name: string, value: string): number {
  if (!/^-?\d+$/.test(value) || !Number.isSafeInteger(Number(value))) {
    throw new UsageError(`invalid value "${value}" for flag --${name}: not an integer`);
  }
  return Number(value);
}

function parseOptions(argv: string[]): Options | undefined {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      options: {
        addr: { type: "string", default: "127.0.0.1:50051" },
        tenant: { type: "string", default: "cpaas-demo" },
        slice: { type: "string", default: "" },
        key: { type: "string", default: "" },
        metric: { type: "string", default: "api.sms.send" },
        units: { type: "string", default: "10" },
        spend: { type: "string", default: "25" },
        holder: { type: "string", default: "" },
        "deadline-ms": { type: "string", default: "5000" },
        "tls-ca": { type: "string", default: "" },
        "tls-cert": { type: "string", default: "" },
        "tls-key": { type: "string", default: "" },
        "api-key": { type: "string", default: "" },
        help: { type: "boolean", short: "h", default: false },
      },
      strict: true,
      allowPositionals: true,
    });
  } catch (err) {
    throw new UsageError(`${(err as Error).message}\n${USAGE}`);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    process.stderr.write(`${USAGE}\n`);
    return undefined;
  }
  if (positionals.length > 0) {
    throw new UsageError(`unexpected argument "${positionals[0]}"`);
  }
  const units = parseIntFlag("units", values.units);
  const spend = parseIntFlag("spend", values.spend);
  const deadlineMs = parseIntFlag("deadline-ms", values["deadline-ms"]);
  if (units < 1 || units > MAX_UNITS) {
    throw new UsageError(`--units must be between 1 and ${MAX_UNITS}`);
  }
  if (spend < 0) {
    throw new UsageError("--spend must be 0 or more");
  }
  if (deadlineMs <= 0) {
    throw new UsageError("--deadline-ms must be more than 0");
  }
  if ((values["tls-cert"] === "") !== (values["tls-key"] === "")) {
    throw new UsageError("--tls-cert and --tls-key go together");
  }
  if (!/^[\x20-\x7e]*$/.test(values["api-key"])) {
    throw new UsageError("--api-key must be printable ASCII");
  }
  return {
    addr: values.addr,
    tenant: values.tenant,
    slice: values.slice,
    key: values.key,
    metric: values.metric,
    units,
    spend,
    holder: values.holder,
    deadlineMs,
    tlsCa: values["tls-ca"],
    tlsCert: values["tls-cert"],
    tlsKey: values["tls-key"],
    apiKey: values["api-key"],
  };
}

function readPem(flag: string, path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    const reason = (err as Error).message.replace(/^[A-Z]+: /, "").replace(/, \w+ '.*'$/, "");
    throw new UsageError(`${flag} ${path}: cannot read: ${reason}`);
  }
}

function channelCredentials(opts: Options): ChannelCredentials {
  if (opts.tlsCa === "" && opts.tlsCert === "") {
    return credentials.createInsecure();
  }
  const ca = opts.tlsCa === "" ? null : readPem("--tls-ca", opts.tlsCa);
  const key = opts.tlsKey === "" ? null : readPem("--tls-key", opts.tlsKey);
  const chain = opts.tlsCert === "" ? null : readPem("--tls-cert", opts.tlsCert);
  try {
    return credentials.createSsl(ca, key, chain);
  } catch (err) {
    throw new UsageError(`TLS options: ${(err as Error).message}`);
  }
}

function millis(d: Duration | undefined): number {
  return d === undefined ? 0 : d.seconds * 1000 + Math.trunc(d.nanos / 1_000_000);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** The lease as this program sees it: every level counts units since the start. */
class Holder {
  leaseId = "";
  spent = 0; // units allowed locally
  reported = 0; // units sent in a report
  limit = 0; // spent may reach this: reported + what the gateway says is available
  renewBelow = 0;
  final = false;

  constructor(
    private readonly client: LeaseServiceClient,
    private readonly metadata: Metadata,
    private readonly opts: Options,
  ) {}

  private call(request: LeaseRequest): Promise<LeaseAnswer> {
    return new Promise((resolve, reject) => {
      this.client.lease(
        request,
        this.metadata,
        { deadline: new Date(Date.now() + this.opts.deadlineMs) },
        (err, response) => (err ? reject(err) : resolve(response.answer ?? LeaseAnswer.fromPartial({}))),
      );
    });
  }

  /**
   * Sends one ask (open when there is no lease yet, else a renewal or the release, with the
   * units used since the last report), retrying a transient failure with the same request
   * id, and takes in the answer.
   */
  async ask(kind: string, requested: number, release: boolean): Promise<void> {
    const ask = LeaseAsk.fromPartial({
      requestId: randomUUID(),
      subject: { tenant: this.opts.tenant, slice: this.opts.slice, key: this.opts.key },
      metric: this.opts.metric,
      leaseId: this.leaseId,
      requested,
      used: this.spent - this.reported,
      release,
      holder: this.opts.holder,
    });
    let answer: LeaseAnswer | undefined;
    for (let attempt = 1; ; attempt++) {
      try {
        answer = await this.call(LeaseRequest.fromPartial({ ask }));
        break;
      } catch (err) {
        const code = (err as ServiceError).code;
        if (attempt >= ATTEMPTS || (code !== status.UNAVAILABLE && code !== status.DEADLINE_EXCEEDED)) {
          throw new RpcError(err as ServiceError);
        }
        await sleep(BACKOFF_MS * attempt);
      }
    }
    this.reported += ask.used;
    const line = {
      ask: kind,
      request_id: answer.requestId,
      lease_id: answer.leaseId,
      decision: Decision[answer.decision] ?? String(answer.decision),
      reason: Reason[answer.reason] ?? String(answer.reason),
      requested: ask.requested,
      used: ask.used,
      granted: answer.granted,
      available: answer.available,
      renew_below: answer.renewBelow,
      final_units: answer.finalUnits,
      recorded: answer.recorded,
      overage: answer.overage,
      refunded: answer.refunded,
      closed: answer.closed,
      replayed: answer.replayed,
      valid_for_ms: millis(answer.validFor),
    };
    if (answer.message !== "") {
      process.stderr.write(`${PROGRAM}: ${kind}: ${answer.message}\n`);
    }
    if (answer.closed || (kind === "open" && answer.leaseId === "")) {
      // released, expired, or never opened: nothing more may be spent under it
      this.leaseId = "";
      this.limit = this.spent;
    } else {
      this.leaseId = answer.leaseId;
      this.limit = this.reported + answer.available;
      if (answer.renewBelow > 0) {
        this.renewBelow = answer.renewBelow;
      }
      // A renewal that granted nothing (THROTTLE, DENY): spend what is left, ask no more.
      this.final = answer.finalUnits || (requested > 0 && answer.granted === 0);
    }
    process.stdout.write(`${JSON.stringify(line)}\n`);
  }
}

async function execute(opts: Options): Promise<void> {
  const client = new LeaseServiceClient(opts.addr, channelCredentials(opts));
  const metadata = new Metadata();
  if (opts.apiKey !== "") {
    metadata.set("authorization", `Bearer ${opts.apiKey}`);
  }
  try {
    const h = new Holder(client, metadata, opts);
    await h.ask("open", opts.units, false);
    let refused = 0;
    for (let i = 0; i < opts.spend; i++) {
      if (h.leaseId === "") {
        refused++;
        continue;
      }
      if (h.spent + 1 > h.limit && !h.final) {
        // Nothing left and no renewal answered yet: ask now.
        await h.ask("renew", opts.units, false);
      }
      if (h.spent + 1 > h.limit || h.leaseId === "") {
        refused++; // a local refusal: the lease has nothing left
        continue;
      }
      h.spent++; // the local decision: no call
      if (h.limit - h.spent <= h.renewBelow && !h.final) {
        await h.ask("renew", opts.units, false);
      }
    }
    const leaseId = h.leaseId;
    if (h.leaseId !== "") {
      await h.ask("release", 0, true);
    }
    const summary = { ask: "summary", lease_id: leaseId, spent: h.spent, reported: h.reported, refused };
    process.stdout.write(`${JSON.stringify(summary)}\n`);
  } finally {
    client.close();
  }
}

async function main(argv: string[]): Promise<number> {
  try {
    const opts = parseOptions(argv);
    if (opts === undefined) {
      return 0;
    }
    await execute(opts);
    return 0;
  } catch (err) {
    process.stderr.write(`${PROGRAM}: ${(err as Error).message}\n`);
    return err instanceof UsageError ? 2 : 1;
  }
}

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
