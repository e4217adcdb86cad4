-- lease.lua: apply a batch of lease asks of ONE tenant, atomically, on Redis' clock.
--
-- Per ask, in order, together or not at all: its dedup record (a retry replays the first
-- answer and changes nothing), the use it reports (one ledger entry carrying the lease id:
-- units within what the lease has available as recorded, beyond it as overage, debited to
-- the limits like a report, into debt if need be), then a grant (taken from every limit of
-- the ask's set, all or nothing, sized as chargepath/core/leases.py says) or a release
-- (every unit held goes back: lib/lease.lua). A lease found expired is closed first (its
-- units go back) and the ask is answered LEASE_EXPIRED with its use recorded as overage.
--
-- Invariants kept: the units held by open leases plus those admitted and reported never
-- exceed what the limits allow (a grant is an admit of its units); a request id is never
-- marked seen unless its effect is written; the ledger holds every unit reported, once.
-- A stale policy version or a batch past its deadline writes nothing (as decide.lua).
-- Time is Redis TIME (+ the clock offset, 0 outside tests); all amounts are integers.
--
-- The names in capitals come from chargepath/store/protocol.py (LEASE_*, LSPEC_*, ASK_*,
-- ANS_*, HOLD_*, enum codes), which also documents the payload and the reply.
--
-- KEYS[KEY_ENTITLEMENT]    tenant entitlement hash ("v": the policy version stamped)
-- KEYS[KEY_LEDGER]         tenant ledger stream
-- KEYS[LEASE_KEY_INDEX]    tenant lease index (sorted set: lease id scored by expiry)
-- KEYS[LEASE_KEY_TRAIL]    tenant lease decisions (stream, capped; what explain reads)
-- KEYS[5..]                dedup records, lease hashes, counters and quota grants, by index
--                          from the payload
--
-- ARGV[LEASE_ARG_POLICY_VERSION]  the policy version the gateway used
-- ARGV[LEASE_ARG_CLOCK_OFFSET]    clock offset, ms
-- ARGV[LEASE_ARG_DEDUP_WINDOW]    dedup window, ms
-- ARGV[LEASE_ARG_DEADLINE]        the batch's deadline on Redis' clock (TIME), ms; 0: none
-- ARGV[LEASE_ARG_TRAIL_LENGTH]    lease decisions kept for explain (approximate; 0: none)
-- ARGV[LEASE_ARG_PAYLOAD]         MessagePack {specs, sets, asks}
-- ARGV[LEASE_ARG_MAX_OPEN]        the most leases the tenant may hold open, its policy's
--                                 caps.leases (0: no bound): a new lease past it is refused,
--                                 DENY CAP_REACHED, nothing granted
-- ARGV[LEASE_ARG_TENANT]          the tenant's name: a batch that gave units back (a release,
--                                 an expiry) publishes it on ROOM_CHANNEL (store/room.py)
--
-- Reply: {REPLY_STALE, stamped_version}, {REPLY_LATE, time_ms} (nothing written either
-- way), else {REPLY_DECIDED, now_ms, one answer (an array, ANS_* slots, then per limit of
-- the ask's set: remaining, reset_after_ms, capacity) per ask}.

redis.replicate_commands()

-- #include lib/numbers.lua
-- #include lib/specs.lua
-- #include lib/lease.lua

local stamped = tonumber(redis.call('HGET', KEYS[KEY_ENTITLEMENT], 'v') or '0')
if stamped > tonumber(ARGV[LEASE_ARG_POLICY_VERSION]) then
  return {REPLY_STALE, stamped}
end
local t = redis.call('TIME')
local real_now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
local deadline = tonumber(ARGV[LEASE_ARG_DEADLINE])
if deadline > 0 and real_now > deadline then
  return {REPLY_LATE, real_now}
end
local now = real_now + tonumber(ARGV[LEASE_ARG_CLOCK_OFFSET])
local version = tonumber(ARGV[LEASE_ARG_POLICY_VERSION])
local dedup_ms = tonumber(ARGV[LEASE_ARG_DEDUP_WINDOW])
local trail_len = tonumber(ARGV[LEASE_ARG_TRAIL_LENGTH])
local payload = cmsgpack.unpack(ARGV[LEASE_ARG_PAYLOAD])
local specs_in, sets_in, asks = payload[1], payload[2], payload[3]
local index_key = KEYS[LEASE_KEY_INDEX]
local max_open = tonumber(ARGV[LEASE_ARG_MAX_OPEN])
local any_refund = false

local specs = {}
for s = 1, #specs_in / LSPEC_SLOTS do
  local o = LSPEC_SLOTS * (s - 1)
  local spec = read_spec(specs_in, o)
  spec.max_units, spec.share = specs_in[o + LSPEC_MAX_UNITS], specs_in[o + LSPEC_SHARE]
  spec.validity, spec.renew_pct = specs_in[o + LSPEC_VALIDITY], specs_in[o + LSPEC_RENEW]
  specs[s] = spec
end

-- The counter of `spec`, loaded (lib/lease.lua keeps one state per key), and its
-- remaining whole units: a bucket's, or a quota's capacity (amount + live grants) less used.
local function bind(spec)
  if spec.kind == KIND_RATE then
    local st = rate_state(KEYS[spec.idx], spec, now)
    return st, floor(st.level / spec.scale)
  end
  local gk = false
  if spec.grants_idx > 0 then gk = KEYS[spec.grants_idx] end
  local st = quota_state(KEYS[spec.idx], spec.period, gk, now)
  spec.capacity = spec.amount + st.granted
  return st, spec.capacity - st.used
end

-- Debit `amount` to every limit of `set` (reported use beyond a grant: always, into debt).
local function debit(set, amount)
  for _, spec in ipairs(set) do
    local st = bind(spec)
    if spec.kind == KIND_RATE then
      st.level = bucket_debit(st.level, amount * spec.scale)
    else
      st.used = st.used + amount
    end
    st.dirty = true
  end
end

-- The largest grant every limit of `set` allows now (0: none), and if none, the decision,
-- reason and retry_after: a quota out DENYs until its period ends, a bucket THROTTLEs until
-- one unit fits (chargepath/core/leases.py: grant_size).
local function size(set, requested)
  local grant = requested
  local quota_wait, rate_wait = -1, -1
  for _, spec in ipairs(set) do
    local st, rem = bind(spec)
    local cap
    if spec.soft then
      cap = spec.max_units
    elseif rem < 1 then
      cap = 0
      if spec.kind == KIND_RATE then
        rate_wait = math.max(rate_wait, bucket_wait(spec.scale, st.level, spec.refill_per_ms))
      else
        quota_wait = math.max(quota_wait, st.finish - now)
      end
    else
      cap = math.min(spec.max_units, math.max(floor(rem * spec.share / 100), 1))
    end
    if cap < grant then grant = cap end
  end
  if grant > 0 then return grant, ALLOW, OK, 0 end
  if quota_wait >= 0 then return 0, DENY, QUOTA_EXHAUSTED, quota_wait end
  return 0, THROTTLE, RATE_LIMITED, math.max(rate_wait, 0)
end

-- Take `grant` from every limit of `set`, into the holds; whether the limits allow no
-- further grant now (final units) and whether a soft limit went past its capacity.
local function take(set, grant, holds)
  local final, soft_over = false, false
  for _, spec in ipairs(set) do
    local st, rem
    st = bind(spec)
    local key = KEYS[spec.idx]
    local hold
    for _, h in ipairs(holds) do
      if h.key == key then hold = h end
    end
    if not hold then
      hold = {key = key, kind = spec.kind, units = 0, start = 0}
      holds[#holds + 1] = hold
    end
    if spec.kind == KIND_RATE then
      st.level = bucket_debit(st.level, grant * spec.scale)
      rem = floor(st.level / spec.scale)
      hold.capacity_sub, hold.scale = spec.capacity_sub, spec.scale
      hold.refill_per_ms = spec.refill_per_ms
    else
      st.used = st.used + grant
      rem = spec.capacity - st.used
      hold.period = spec.period
      -- units held from an ended period are forfeited with it: its counter has reset
      if hold.start ~= st.start then hold.units, hold.start = 0, st.start end
    end
    hold.units = hold.units + grant
    st.dirty = true
    if spec.soft then
      if rem < 0 then soft_over = true end
    elseif rem < 1 then
      final = true
    end
  end
  return final, soft_over
end

-- Per limit of `set`: remaining, reset_after_ms, capacity, appended to `answer`.
local function limits_into(answer, set)
  for _, spec in ipairs(set) do
    local st, rem = bind(spec)
    local reset, cap
    if spec.kind == KIND_RATE then
      reset, cap = bucket_wait(spec.capacity_sub, st.level, spec.refill_per_ms), spec.capacity
    else
      reset, cap = st.finish - now, spec.capacity
    end
    answer[#answer + 1] = rem
    answer[#answer + 1] = reset
    answer[#answer + 1] = cap
  end
end

local function ledger_entry(o, lease_id, d, r, used, recorded, overage)
  local fields = {'rid', asks[o + ASK_REQUEST_ID], 'did', asks[o + ASK_DECISION_ID],
    'sl', asks[o + ASK_SLICE], 'k', asks[o + ASK_KEY], 'm', asks[o + ASK_METRIC],
    'a', int(used), 'mo', 'lease', 'd', d, 'r', r, 'pv', version, 'ts', int(now),
    'ls', lease_id, 'rc', int(recorded), 'ov', int(overage)}
  local labels = asks[o + ASK_LABELS]
  if labels ~= '' then
    fields[#fields + 1] = 'lb'
    fields[#fields + 1] = labels
  end
  redis.call('XADD', KEYS[KEY_LEDGER], '*', unpack(fields))
end

local reply = {REPLY_DECIDED, now}
local NONE = {}

for o = 0, #asks - 1, ASK_SLOTS do
  local flags = asks[o + ASK_FLAGS]
  local requested, used = asks[o + ASK_REQUESTED], asks[o + ASK_USED]
  local dedup_key = KEYS[asks[o + ASK_DEDUP_KEY]]
  local lease_key = KEYS[asks[o + ASK_LEASE_KEY]]
  local lease_id = asks[o + ASK_LEASE_ID]
  local fp, did = asks[o + ASK_FINGERPRINT], asks[o + ASK_DECISION_ID]
  local set_no = asks[o + ASK_SET]
  local set = NONE
  if set_no > 0 then
    set = {}
    for j, s in ipairs(sets_in[set_no]) do set[j] = specs[s] end
  end
  local release = flags % (2 * ASK_RELEASE) >= ASK_RELEASE
  local suspended = flags % (2 * ASK_SUSPENDED) >= ASK_SUSPENDED
  local new = flags % (2 * ASK_NEW) >= ASK_NEW

  local answer
  local record = redis.call('GET', dedup_key)
  if record then
    local rec = cmsgpack.unpack(record)
    answer = rec[2]
    if rec[1] ~= fp then
      answer = {DENY, INVALID_USAGE, LEASE_CONFLICT, lease_id, 0, 0, 0, 0, 0, 0, 0, 0,
        answer[ANS_DECISION_ID], now}
    else
      answer[ANS_FLAGS] = answer[ANS_FLAGS] + LEASE_REPLAYED
    end
  else
    -- bind the counters of the set first: a refund then lands in the state of the
    -- current spec (lib/lease.lua)
    for _, spec in ipairs(set) do bind(spec) end
    local lease, mismatch, expired = nil, false, false
    local back = 0
    if not new then
      lease = lease_read(lease_key)
      if lease and (lease.sl ~= asks[o + ASK_SLICE] or lease.k ~= asks[o + ASK_KEY]
          or lease.m ~= asks[o + ASK_METRIC]) then
        mismatch = true
      elseif lease and lease.x <= now then
        back = lease_close(index_key, lease_key, lease_id, lease, now)
        lease = nil
      end
      if not lease then expired = true end
    end

    local d, r, aflags = ALLOW, OK, 0
    local granted, recorded, overage, refunded, retry = 0, 0, 0, 0, 0
    local available, valid_for, renew = 0, 0, 0
    if mismatch then
      d, r, aflags = DENY, INVALID_USAGE, LEASE_MISMATCH
      lease = nil
    elseif expired then
      -- the lease is over: its use is overage, debited like a report
      d, r, aflags = DENY, LEASE_EXPIRED, LEASE_CLOSED
      overage, refunded = used, back
      if used > 0 then
        debit(set, used)
        ledger_entry(o, lease_id, d, r, used, 0, used)
      end
    else
      local holds = {}
      if lease then
        holds = holds_read(lease.hd)
      else
        lease = {g = 0, u = 0, o = 0, a = 0, x = 0, c = now, lg = 0, rp = 0, vm = 0, v = version}
      end
      if used > 0 then
        recorded = math.min(used, lease.a)
        overage = used - recorded
        lease.a, lease.u, lease.o = lease.a - recorded, lease.u + recorded, lease.o + overage
        -- use spends the oldest units first: those of an ended quota period, then the rest
        for _, h in ipairs(holds) do
          if h.units > lease.a then h.units = lease.a end
        end
        if overage > 0 then debit(set, overage) end
      end
      if release then
        refunded = holds_refund(holds, now)
        aflags = LEASE_CLOSED
        redis.call('DEL', lease_key)
        redis.call('ZREM', index_key, lease_id)
        if used > 0 then ledger_entry(o, lease_id, d, r, used, recorded, overage) end
        lease = nil
      else
        if requested > 0 then
          if suspended then
            d, r = DENY, SUSPENDED
          elseif new and max_open > 0 and redis.call('ZCARD', index_key) >= max_open then
            d, r, aflags = DENY, CAP_REACHED, LEASE_CAPPED
          else
            granted, d, r, retry = size(set, requested)
          end
          if granted > 0 then
            local final, soft_over = take(set, granted, holds)
            if final then aflags = aflags + LEASE_FINAL end
            if soft_over then r = SOFT_LIMIT_EXCEEDED end
            local validity, pct = -1, 100
            for _, spec in ipairs(set) do
              if validity < 0 or spec.validity < validity then validity = spec.validity end
              if spec.renew_pct < pct then pct = spec.renew_pct end
            end
            lease.g, lease.a, lease.lg = lease.g + granted, lease.a + granted, granted
            lease.x, lease.vm, lease.rp, lease.v = now + validity, validity, pct, version
          end
        end
        if used > 0 then ledger_entry(o, lease_id, d, r, used, recorded, overage) end
        if new and granted == 0 then
          lease_id = ''
          lease = nil
        else
          redis.call('HSET', lease_key, 'sl', asks[o + ASK_SLICE], 'k', asks[o + ASK_KEY],
            'm', asks[o + ASK_METRIC], 'h', lease.h or asks[o + ASK_HOLDER], 'g', int(lease.g),
            'u', int(lease.u), 'o', int(lease.o), 'a', int(lease.a), 'x', int(lease.x),
            'c', int(lease.c), 'v', int(lease.v), 'lg', int(lease.lg), 'rp', int(lease.rp),
            'vm', int(lease.vm), 'hd', holds_pack(holds))
          -- the hash outlives its expiry by the dedup window: the sweeper closes it first
          redis.call('PEXPIREAT', lease_key, lease.x + dedup_ms)
          redis.call('ZADD', index_key, lease.x, lease_id)
          available, valid_for = lease.a, lease.x - now
          renew = ceil_div(lease.lg * lease.rp, 100)
        end
      end
    end
    answer = {d, r, aflags, lease_id, granted, available, valid_for, renew, retry, recorded,
      overage, refunded, did, now}
    limits_into(answer, set)
    if not mismatch then
      redis.call('SET', dedup_key, cmsgpack.pack({fp, answer}), 'PX', dedup_ms)
      if trail_len > 0 then
        redis.call('XADD', KEYS[LEASE_KEY_TRAIL], 'MAXLEN', '~', trail_len, '*',
          'did', did, 'rid', asks[o + ASK_REQUEST_ID], 'sl', asks[o + ASK_SLICE],
          'k', asks[o + ASK_KEY], 'm', asks[o + ASK_METRIC], 'ls', lease_id,
          'h', asks[o + ASK_HOLDER], 'd', d, 'r', r, 'q', int(requested), 'us', int(used),
          'g', int(granted), 'rc', int(recorded), 'ov', int(overage), 'rf', int(refunded),
          'pv', version, 'ts', int(now), 'tr', asks[o + ASK_TRACE_ID])
      end
    end
  end
  reply[#reply + 1] = answer
  if answer[ANS_REFUNDED] and answer[ANS_REFUNDED] > 0 then any_refund = true end
end

counters_close(now)
if any_refund and ARGV[LEASE_ARG_TENANT] then
  -- units went back to the limits (a release, an expiry): room, for the over-limit caches
  redis.call('PUBLISH', ROOM_CHANNEL, ARGV[LEASE_ARG_TENANT])
end
return reply
