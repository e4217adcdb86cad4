-- reverse.lua: cancel a usage that decide.lua recorded after its caller had been answered by the
-- failure policy and refused (a late commit of an admit answered DENY or THROTTLE), so that
-- billing never charges a refused caller. Written by the engine when such a late reply comes
-- in (chargepath/engine.py); see Reversal in chargepath/store/base.py.
--
-- Invariant: a reversal is written at most once per recorded decision, and only while that
-- decision's dedup record (request id record, or session slot) still holds it as recorded;
-- the record is forgotten in the same step (the request id's deleted, the slot's sequence
-- blanked), so a resend of the usage is decided anew, and counted once if recorded then.
-- In the same step, the units the admit took from each of its limits are given back, as a
-- lease refund gives units back (lib/lease.lua): a bucket's level up by the amount, never
-- above its capacity; a quota's used units down by the amount (never below 0), only if the
-- period the late decision debited (ARGV[14]) is still the current one: a period that has
-- ended took nothing from the current one. So once reversed, the ledger and the limits
-- agree: neither counts the refused admit. A reversal that writes nothing (reply 0) gives
-- nothing back, so a reversal applied twice credits once.
--
-- KEYS[1]  tenant ledger stream
-- KEYS[2]  the usage's request-id dedup record, or its session key
-- KEYS[3]  for a session usage: its request id's dedup record, which decide.lua also wrote
--          if the batch ran in doubt (ARG_DOUBT); deleted with the slot if it holds this
--          decision
-- KEYS[n]  the counters of the admit's limits (bucket and quota hashes), by the key indices
--          of ARGV[15]'s specs
--
-- ARGV[1]  the decision id recorded (the late decision's)
-- ARGV[2]  the session sequence, or -1 for a request-id record
-- ARGV[3]  the session replay window W
-- ARGV[4..12]  the reversal entry's request id, slice, key, metric, amount, mode, decision and
--              reason (those the caller was answered), policy version
-- ARGV[13] the clock offset, ms (as decide.lua's ARG_CLOCK_OFFSET)
-- ARGV[14] when the late decision was taken, ms (Redis' clock + the offset, as decide.lua's
--          reply says it); 0: unknown, and no quota is credited
-- ARGV[15] MessagePack: the specs of the limits the admit took from (decide.lua's layout,
--          SPEC_SLOTS values each, lib/specs.lua), as the late decision had them
-- ARGV[16] the tenant's name (published on ROOM_CHANNEL when something was credited)
--
-- Ledger entry written: fields rv=1, rid, did, sl, k, m, a, mo, d, r, pv, ts (Redis' clock,
-- ms); chargepath/store/ledger.py reads it as a LedgerEntry with reversal=True.
--
-- Reply: 1 written, 0 not (the record no longer holds this decision as recorded).

redis.replicate_commands()

-- #include lib/numbers.lua
-- #include lib/specs.lua
-- #include lib/periods.lua
-- #include lib/bucket.lua
-- #include lib/quota.lua

local did, seq, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

if seq < 0 then
  local rec = redis.call('GET', KEYS[2])
  if not rec then return 0 end
  local f = split_bars(rec)
  if f[6] ~= did or tonumber(f[5]) ~= VERDICT_RECORDED then return 0 end
  redis.call('DEL', KEYS[2])
else
  local off = SESSION_SEQ_DIGITS + (seq % window) * SESSION_SLOT
  local slot = redis.call('GETRANGE', KEYS[2], off, off + SESSION_SLOT - 1)
  if string.len(slot) ~= SESSION_SLOT or tonumber(sub(slot, 1, SESSION_SEQ_DIGITS)) ~= seq
    or tonumber(sub(slot, SESSION_SLOT_RECORDED + 1, SESSION_SLOT_RECORDED + 1))
      ~= VERDICT_RECORDED
    or sub(slot, SESSION_SLOT_ID + 1, SESSION_SLOT_ID + SESSION_ID_CHARS)
      ~= format(SESSION_ID_FORMAT, did) then
    return 0
  end
  -- a blank sequence matches no sequence: the slot reads as never decided
  redis.call('SETRANGE', KEYS[2], off, string.rep(' ', SESSION_SEQ_DIGITS))
  do
    local rec = redis.call('GET', KEYS[3])
    if rec and split_bars(rec)[6] == did then redis.call('DEL', KEYS[3]) end
  end
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)

-- The credit: what the recorded admit took from each of its limits (it took `amount` from
-- every one: an admit is all or nothing).
local amount = tonumber(ARGV[8])
local clock_now = now + tonumber(ARGV[13])
local decided_at = tonumber(ARGV[14])
local specs_in = cmsgpack.unpack(ARGV[15])
local credited = false
for o = 0, #specs_in - 1, SPEC_SLOTS do
  local spec = read_spec(specs_in, o)
  local key = KEYS[spec.idx]
  if spec.kind == KIND_RATE then
    local level = bucket_read(key, spec, clock_now)
    bucket_write(key, math.min(spec.capacity_sub, level + amount * spec.scale), spec,
      int(clock_now))
    credited = true
  elseif decided_at > 0 then
    local start, finish, used = quota_read(key, spec.period, clock_now)
    if start == period_bounds(decided_at, spec.period) and used > 0 then
      quota_write(key, start, finish, math.max(0, used - amount), clock_now)
      credited = true
    end
  end
end
if credited then
  -- room for the over-limit caches, as a lease refund publishes it
  redis.call('PUBLISH', ROOM_CHANNEL, ARGV[16])
end

redis.call('XADD', KEYS[1], '*', 'rv', '1', 'rid', ARGV[4], 'did', did, 'sl', ARGV[5],
  'k', ARGV[6], 'm', ARGV[7], 'a', ARGV[8], 'mo', ARGV[9], 'd', ARGV[10], 'r', ARGV[11],
  'pv', ARGV[12], 'ts', int(now))
return 1
