// chargepath-example for Node.js: drives a Chargepath gateway through the TypeScript stubs
// that ts-proto generates from protos/chargepath/v1 into gen/ (scripts/setup-node.sh).
//
// It makes the Check calls and the StreamUsage session that a script file lists (or a
// built-in demo) and prints one JSON line per verdict on stdout. The Go example in
// clients/go behaves identically, flag for flag and line for line; an end-to-end test
// (tests/e2e/test_interop.py) compares the two.
//
// Exit status: 0 when every call succeeded, 1 when an RPC failed (the gRPC status code and
// details are printed on stderr), 2 for a bad command line or script file.

import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import {
  type ChannelCredentials,
  type ClientDuplexStream,
  credentials,
  Metadata,
  type ServiceError,
  status,
} from "@grpc/grpc-js";

import { type Duration } from "./gen/google/protobuf/duration";
import {
  Decision,
  MeteringServiceClient,
  Mode,
  Reason,
  type StreamUsageRequest,
  type StreamUsageResponse,
  Usage,
  type Verdict,
  VerdictView,
} from "./gen/chargepath/v1/metering";

const PROGRAM = "chargepath-example";

/** The command-line flags: the same names, defaults and meaning as the Go example's. */
interface Options {
  addr: string;
  scriptPath: string;
  dropAfter: number;
  deadlineMs: number;
  /** TLS (any of the three set) and its files; plaintext when none is. */
  tlsCa: string;
  tlsCert: string;
  tlsKey: string;
  /** Sent as "authorization: Bearer <key>" metadata on every call; "" sends none. */
  apiKey: string;
}

/**
 * What to send: Check usages first, then one StreamUsage session whose batches go out one at
 * a time (the next batch is sent once the previous one is answered, so the output is
 * deterministic and a drop after N responses means exactly N batches were decided).
 */
interface Workload {
  checks: Usage[];
  sessionId: string;
  batches: Usage[][];
}

/** A bad command line or script file (exit status 2). */
class UsageError extends Error {}

/** A failed call (exit status 1). */
class RpcError extends Error {
  constructor(call: string, err: ServiceError) {
    super(`${call} failed: ${status[err.code] ?? String(err.code)}: ${err.details}`);
  }
}

const USAGE = `usage: ${PROGRAM} [--addr HOST:PORT] [--script FILE] [--drop-after N] [--deadline-ms MS]
       [--tls-ca FILE] [--tls-cert FILE --tls-key FILE] [--api-key KEY]
  --addr HOST:PORT    gateway address (default "127.0.0.1:50051")
  --script FILE       JSON script of Check usages and stream batches (default: built-in demo)
  --drop-after N      cancel the stream after N responses, reconnect and resend every batch (0: never)
  --deadline-ms MS    deadline of each call (a whole stream is one call), in milliseconds (default 5000)
  --tls-ca FILE       TLS: trust the CA certificates in this PEM file (default: plaintext; with only
                      --tls-cert/--tls-key, the system's CAs)
  --tls-cert FILE     mTLS: the client certificate chain, a PEM file (with --tls-key)
  --tls-key FILE      mTLS: the client certificate's private key, an unencrypted PEM file (with --tls-cert)
  --api-key KEY       send "authorization: Bearer KEY" metadata on every call`;

function parseIntFlag(name: string, value: string): number {
  if (!/^-?\d+$/.test(value)) {
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
        script: { type: "string", default: "" },
        "drop-after": { type: "string", default: "0" },
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
  const dropAfter = parseIntFlag("drop-after", values["drop-after"]);
  const deadlineMs = parseIntFlag("deadline-ms", values["deadline-ms"]);
  if (dropAfter < 0) {
    throw new UsageError("--drop-after must be 0 or more");
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
    scriptPath: values.script,
    dropAfter,
    deadlineMs,
    tlsCa: values["tls-ca"],
    tlsCert: values["tls-cert"],
    tlsKey: values["tls-key"],
    apiKey: values["api-key"],
  };
}

/** A PEM file named by a flag; a file that cannot be read is a bad command line. */
function readPem(flag: string, path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    // "ENOENT: no such file or directory, open '...'" -> "no such file or directory"
    const reason = (err as Error).message.replace(/^[A-Z]+: /, "").replace(/, \w+ '.*'$/, "");
    throw new UsageError(`${flag} ${path}: cannot read: ${reason}`);
  }
}

/**
 * The channel's credentials: plaintext by default, TLS when a --tls-* flag is given
 * (trusting --tls-ca, else the system's CAs), with a client certificate for mTLS.
 */
function channelCredentials(opts: Options): ChannelCredentials {
  if (opts.tlsCa === "" && opts.tlsCert === "") {
    return credentials.createInsecure();
  }
  let ca: Buffer | null = null;
  if (opts.tlsCa !== "") {
    ca = readPem("--tls-ca", opts.tlsCa);
    if (!ca.includes("-----BEGIN CERTIFICATE-----")) {
      throw new UsageError(`--tls-ca ${opts.tlsCa}: no PEM certificate in it`);
    }
  }
  const key = opts.tlsKey === "" ? null : readPem("--tls-key", opts.tlsKey);
  const chain = opts.tlsCert === "" ? null : readPem("--tls-cert", opts.tlsCert);
  try {
    return credentials.createSsl(ca, key, chain);
  } catch (err) {
    const files = opts.tlsCert === "" ? `--tls-ca ${opts.tlsCa}` : `--tls-cert ${opts.tlsCert}, --tls-key ${opts.tlsKey}`;
    throw new UsageError(`${files}: ${(err as Error).message}`);
  }
}

/**
 * The metadata of every call: the API key, if any. grpc-js's call credentials are refused on
 * a plaintext channel, and a gateway on loopback may take keys without TLS, so the key travels
 * as plain call metadata.
 */
function callMetadata(opts: Options): Metadata {
  const metadata = new Metadata();
  if (opts.apiKey !== "") {
    metadata.set("authorization", `Bearer ${opts.apiKey}`);
  }
  return metadata;
}

// Protobuf JSON accepts a field by its proto name or its lowerCamelCase JSON name. ts-proto's
// fromJSON is lenient (it ignores unknown fields and maps unknown enum names to -1), so the
// script is checked here first: a typo fails as it does in the Go example, not silently.
const USAGE_FIELDS: Record<string, string> = {
  request_id: "request_id", requestId: "request_id",
  subject: "subject",
  metric: "metric",
  amount: "amount",
  mode: "mode",
  labels: "labels",
  occurred_at: "occurred_at", occurredAt: "occurred_at",
  session_id: "session_id", sessionId: "session_id",
  sequence: "sequence",
};
const SUBJECT_FIELDS = new Set(["tenant", "slice", "key"]);

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function checkInteger(value: unknown, field: string, min: bigint, max: bigint): void {
  const text = typeof value === "number" && Number.isInteger(value) ? String(value) : value;
  if (typeof text !== "string" || !/^-?\d+$/.test(text) || BigInt(text) < min || BigInt(text) > max) {
    throw new Error(`invalid value for ${field}: ${JSON.stringify(value)}`);
  }
  if (BigInt(text) > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new Error(`${field}: ${text} is more than this client can send exactly (2^53 - 1)`);
  }
}

function checkString(value: unknown, field: string): void {
  if (typeof value !== "string") {
    throw new Error(`invalid value for string field ${field}: ${JSON.stringify(value)}`);
  }
}

function parseUsage(raw: unknown): Usage {
  if (!isPlainObject(raw)) {
    throw new Error("a usage must be a JSON object");
  }
  const seen = new Set<string>();
  for (const [name, value] of Object.entries(raw)) {
    const field = USAGE_FIELDS[name];
    if (field === undefined) {
      throw new Error(`unknown field "${name}"`);
    }
    if (seen.has(field)) {
      throw new Error(`duplicate field "${name}"`);
    }
    seen.add(field);
    if (value === null) {
      continue; // JSON null means "not set", as in protobuf JSON.
    }
    switch (field) {
      case "request_id":
      case "metric":
      case "session_id":
        checkString(value, field);
        break;
      case "amount":
        checkInteger(value, field, -(2n ** 63n), 2n ** 63n - 1n);
        break;
      case "sequence":
        checkInteger(value, field, 0n, 2n ** 64n - 1n);
        break;
      case "mode":
        if (typeof value === "number") {
          checkInteger(value, field, -(2n ** 31n), 2n ** 31n - 1n);
        } else if (typeof value !== "string" || !(value in Mode) || value === "UNRECOGNIZED") {
          throw new Error(`invalid value for enum type: ${JSON.stringify(value)}`);
        }
        break;
      case "subject":
        if (!isPlainObject(value)) {
          throw new Error("subject must be a JSON object");
        }
        for (const [key, part] of Object.entries(value)) {
          if (!SUBJECT_FIELDS.has(key)) {
            throw new Error(`unknown field "subject.${key}"`);
          }
          if (part !== null) {
            checkString(part, `subject.${key}`);
          }
        }
        break;
      case "labels":
        if (!isPlainObject(value)) {
          throw new Error("labels must be a JSON object");
        }
        for (const [key, label] of Object.entries(value)) {
          checkString(label, `labels.${key}`);
        }
        break;
      case "occurred_at":
        if (typeof value !== "string" || Number.isNaN(Date.parse(value))) {
          throw new Error(`invalid value for occurred_at: ${JSON.stringify(value)}`);
        }
        break;
    }
  }
  return Usage.fromJSON(raw);
}

function loadWorkload(path: string): Workload {
  if (path === "") {
    return demoWorkload();
  }
  let data: string;
  try {
    data = readFileSync(path, "utf8");
  } catch (err) {
    throw new UsageError(`cannot read script: ${(err as Error).message}`);
  }
  let file: unknown;
  try {
    file = JSON.parse(data);
  } catch (err) {
    throw new UsageError(`${path}: not a valid script: ${(err as Error).message}`);
  }
  if (!isPlainObject(file)) {
    throw new UsageError(`${path}: not a valid script: the top level must be a JSON object`);
  }
  const work: Workload = { checks: [], sessionId: "", batches: [] };
  const checks = file.check ?? [];
  if (!Array.isArray(checks)) {
    throw new UsageError(`${path}: not a valid script: "check" must be an array`);
  }
  checks.forEach((raw: unknown, i: number) => {
    try {
      work.checks.push(parseUsage(raw));
    } catch (err) {
      throw new UsageError(`${path}: check[${i}]: ${(err as Error).message}`);
    }
  });
  const stream = file.stream ?? null;
  if (stream !== null) {
    if (!isPlainObject(stream)) {
      throw new UsageError(`${path}: not a valid script: "stream" must be an object`);
    }
    const sessionId = stream.session_id ?? "";
    const batches = stream.batches ?? [];
    if (typeof sessionId !== "string") {
      throw new UsageError(`${path}: not a valid script: "stream.session_id" must be a string`);
    }
    if (!Array.isArray(batches) || !batches.every((batch) => Array.isArray(batch) || batch === null)) {
      throw new UsageError(`${path}: not a valid script: "stream.batches" must be an array of arrays`);
    }
    work.sessionId = sessionId;
    batches.forEach((batch: unknown[] | null, b: number) => {
      work.batches.push(
        (batch ?? []).map((raw: unknown, i: number) => {
          let usage: Usage;
          try {
            usage = parseUsage(raw);
          } catch (err) {
            throw new UsageError(`${path}: stream.batches[${b}][${i}]: ${(err as Error).message}`);
          }
          if (usage.sessionId !== "" && usage.sessionId !== sessionId) {
            throw new UsageError(
              `${path}: stream.batches[${b}][${i}]: session_id "${usage.sessionId}" differs from ` +
                `the stream's session_id "${sessionId}"`,
            );
          }
          return { ...usage, sessionId };
        }),
      );
    });
  }
  return work;
}

/**
 * The built-in demo: one admit for the CPaaS tenant, then a report stream of two batches of
 * three for a slice of the MVNO tenant, under a fresh session.
 */
function demoWorkload(): Workload {
  const check = Usage.fromPartial({
    requestId: randomUUID(),
    subject: { tenant: "cpaas-demo", key: "key-1" },
    metric: "api.sms.send",
    amount: 1,
    mode: Mode.MODE_ADMIT,
  });
  const sessionId = randomUUID();
  const batches: Usage[][] = [];
  let seq = 0;
  for (let b = 0; b < 2; b++) {
    const batch: Usage[] = [];
    for (let i = 0; i < 3; i++) {
      seq++;
      batch.push(
        Usage.fromPartial({
          requestId: `${sessionId}-${seq}`,
          subject: { tenant: "mvno-demo", slice: "1-000001" },
          metric: "slice.bytes",
          amount: 1000000,
          mode: Mode.MODE_REPORT,
          sessionId,
          sequence: seq,
        }),
      );
    }
    batches.push(batch);
  }
  return { checks: [check], sessionId, batches };
}

/** The value's name in the proto, or its number for a value this build does not know. */
function enumName(names: Record<number, string>, value: number): string {
  const name = names[value];
  return name === undefined || name === "UNRECOGNIZED" ? String(value) : name;
}

/** A duration rounded up to whole milliseconds: waiting that long is never too early. */
function ceilMillis(d: Duration | undefined): number {
  if (d === undefined) {
    return 0;
  }
  return d.seconds * 1000 + Math.ceil(d.nanos / 1e6);
}

function printVerdict(v: Verdict): void {
  if (v.message !== "") {
    process.stderr.write(`${PROGRAM}: ${v.requestId}: ${v.message}\n`);
  }
  // The key order is part of the output format.
  const line = {
    request_id: v.requestId,
    decision: enumName(Decision, v.decision),
    reason: enumName(Reason, v.reason),
    replayed: v.replayed,
    recorded: v.recorded,
    degraded: v.degraded,
    policy_version: v.policyVersion,
    decision_id: v.decisionId,
    retry_after_ms: ceilMillis(v.retryAfter),
  };
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

function deadlineIn(ms: number): Date {
  return new Date(Date.now() + ms);
}

function check(
  client: MeteringServiceClient,
  metadata: Metadata,
  deadlineMs: number,
  usage: Usage,
): Promise<Verdict> {
  return new Promise((resolve, reject) => {
    const request = { usage, view: VerdictView.VERDICT_VIEW_FULL };
    client.check(request, metadata, { deadline: deadlineIn(deadlineMs) }, (err, resp) => {
      if (err !== null) {
        reject(new RpcError("Check", err));
      } else if (resp.verdict === undefined) {
        reject(new Error("Check: the response has no verdict"));
      } else {
        resolve(resp.verdict);
      }
    });
  });
}

/**
 * Receives one response at a time from a duplex call: resolves with the next message,
 * with undefined once the server has ended the call with OK, and rejects with its status
 * otherwise.
 */
class ResponseReader {
  private readonly queue: StreamUsageResponse[] = [];
  private waiter?: { resolve: (r?: StreamUsageResponse) => void; reject: (e: Error) => void };
  private ended = false;
  private failure?: ServiceError;

  constructor(call: ClientDuplexStream<StreamUsageRequest, StreamUsageResponse>) {
    call.on("data", (resp: StreamUsageResponse) => {
      this.queue.push(resp);
      this.wake();
    });
    call.on("end", () => {
      this.ended = true;
      this.wake();
    });
    call.on("error", (err: ServiceError) => {
      this.failure = err;
      this.wake();
    });
  }

  next(): Promise<StreamUsageResponse | undefined> {
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject };
      this.wake();
    });
  }

  private wake(): void {
    const waiter = this.waiter;
    if (waiter === undefined) {
      return;
    }
    if (this.queue.length > 0) {
      this.waiter = undefined;
      waiter.resolve(this.queue.shift());
    } else if (this.failure !== undefined) {
      this.waiter = undefined;
      waiter.reject(new RpcError("StreamUsage", this.failure));
    } else if (this.ended) {
      this.waiter = undefined;
      waiter.resolve(undefined);
    }
  }
}

/**
 * Sends the batches over one StreamUsage call, one batch in flight at a time, and prints
 * their verdicts. With dropAfter > 0 it cancels the call once it has received dropAfter
 * responses and returns true (dropped).
 */
async function streamOnce(
  client: MeteringServiceClient,
  metadata: Metadata,
  deadlineMs: number,
  batches: Usage[][],
  dropAfter: number,
): Promise<boolean> {
  const call = client.streamUsage(metadata, { deadline: deadlineIn(deadlineMs) });
  const reader = new ResponseReader(call);
  for (const [i, batch] of batches.entries()) {
    call.write({ usages: batch, view: VerdictView.VERDICT_VIEW_FULL });
    const resp = await reader.next();
    if (resp === undefined) {
      throw new Error(`StreamUsage: the server ended the stream without answering batch ${i}`);
    }
    if (resp.verdicts.length !== batch.length) {
      throw new Error(
        `StreamUsage: batch ${i} of ${batch.length} usages got ${resp.verdicts.length} verdicts`,
      );
    }
    resp.verdicts.forEach(printVerdict);
    if (dropAfter > 0 && i + 1 === dropAfter) {
      call.cancel(); // Drop the call as a crashed or disconnected client would.
      return true;
    }
  }
  call.end();
  if ((await reader.next()) !== undefined) {
    throw new Error("StreamUsage: the server sent a response after the last batch's");
  }
  return false;
}

async function execute(opts: Options, work: Workload): Promise<void> {
  // Plaintext unless a --tls-* flag is given. The channel connects lazily: an unreachable
  // gateway, or a failed TLS handshake, shows up as UNAVAILABLE on the call.
  const client = new MeteringServiceClient(opts.addr, channelCredentials(opts));
  const metadata = callMetadata(opts);
  try {
    for (const usage of work.checks) {
      printVerdict(await check(client, metadata, opts.deadlineMs, usage));
    }
    if (work.batches.length === 0) {
      return;
    }
    const dropped = await streamOnce(
      client,
      metadata,
      opts.deadlineMs,
      work.batches,
      opts.dropAfter,
    );
    if (!dropped) {
      if (opts.dropAfter > 0) {
        process.stderr.write(
          `${PROGRAM}: --drop-after ${opts.dropAfter}: the stream ended after ` +
            `${work.batches.length} responses; nothing was dropped\n`,
        );
      }
      return;
    }
    process.stderr.write(
      `${PROGRAM}: cancelled the stream after ${opts.dropAfter} responses; reconnecting and ` +
        `resending all ${work.batches.length} batches of session "${work.sessionId}"\n`,
    );
    await streamOnce(client, metadata, opts.deadlineMs, work.batches, 0);
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
    await execute(opts, loadWorkload(opts.scriptPath));
    return 0;
  } catch (err) {
    process.stderr.write(`${PROGRAM}: ${(err as Error).message}\n`);
    return err instanceof UsageError ? 2 : 1;
  }
}

main(process.argv.slice(2)).then((code) => {
  process.exitCode = code;
});
