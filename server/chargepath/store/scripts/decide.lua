-- decide.lua: decide a batch of usages of ONE tenant, atomically, on Redis' clock.
--
-- Invariants kept (DESIGN properties 1-5):
--  * All-or-nothing admit: units are taken from every matching limit, or from none.
--  * A report is always debited (a bucket may go into debt) and recorded.
--  * The dedup record (request id or session sequence), the debits and the ledger entry (or
--    the ledger aggregate) are written in this one script: an id is never marked seen unless
--    its effect is written, and nothing recorded is ever left out of the ledger.
--  * A gateway deciding with a policy version older than the tenant's stamp is refused (STALE)
--    before anything is written, so no decision uses a version older than the last change.
--  * Time is Redis TIME (+ ARGV clock offset, 0 outside tests); all amounts are integers.
--    Lua numbers are doubles: every value stays below 2^53 (the gateway checks the bounds).
--    Numbers are written as text with string.format('%d') (a C long: exact for every integer
--    double below 2^63), never with Lua's own '%.14g'.
--
-- KEYS[1]  tenant entitlement hash ("v" = policy version stamped by the last publish)
-- KEYS[2]  tenant ledger stream
-- KEYS[3]  tenant recent-decisions stream (for state, explain and watch; capped)
-- KEYS[4]  tenant ledger aggregates hash (plans with per-interval ledger aggregates)
-- KEYS[5..] dedup, session, bucket, quota and grant keys, referenced by index from ARGV
--
-- ARGV[1] policy version the gateway decided with
-- ARGV[2] clock offset, ms
-- ARGV[3] dedup window, ms
-- ARGV[4] session ttl, ms
-- ARGV[5] session replay window W (slots kept per session)
-- ARGV[6] recent-decisions trail length, in decisions (approximate; 0: not kept)
-- ARGV[7] MessagePack array of three arrays (one argument instead of thousands: packing and
--   parsing them dominated):
--   1. limit specs, flat, 8 values per spec; spec s (1-based) starts at 8 * (s - 1) + 1:
--        key index, kind (1 rate, 2 quota), soft (0/1),
--          rate:  capacity in sub-units, sub-units per unit, refill in sub-units per ms, 0
--          quota: amount in units, period (1 hour, 2 day, 3 month), 0, grants key index
--        name
--      Two specs may name the same key (same limit name and scope instance): they share the
--      counter, loaded once.
--   2. limit sets: an array of arrays of spec numbers, in the order of the usage's limits
--      (the usages of a batch mostly share their limits: each distinct set is sent once)
--   3. the usages, flat, 11 values per usage:
--        flags (1 report, 2 entitled, 4 suspended, 8 session: the key index is a session,
--          else a request-id dedup key), amount, dedup or session key index (0: none),
--        sequence, fingerprint (dedup records), decision_id, limit set number (0: no limits),
--        ledger aggregation interval ms (0: one ledger entry per usage),
--        text: "request_id US decision_id US slice US key US metric US amount US mode"
--          (US = 0x1F; mode "admit" or "report"; no part may hold 0x1F),
--        ledger tail: "" or "US occurred_at_ms US labels JSON" for a ledger entry; for an
--          aggregated usage "|slice|key|metric|mode", the aggregate's field after its interval,
--        trace id
--
-- ARGV[8] "0": basic view, a decision with reason OK replies no limits (L = 0); else every
--   decision replies its limits. The trail keeps them either way.
--
-- Reply: {0, stamped_version} when the tenant's stamp is newer than ARGV[1] (nothing written),
-- else {1, now_ms, then per usage:
--   code = decision + 4 * reason + 64 * flags + 1024 * L, retry_after_ms,
--   the decision_id of the record only when flags has 1 or 4 (answered from a record),
--   then per limit (L of them, in the order of the usage's limit set):
--     remaining units, reset_after_ms (-1 - reset_after_ms when the limit is exceeded),
--     and for a quota only its capacity in units (a rate's capacity is the plan's)}.
-- flags: 1 replayed, 2 recorded, 4 request_id reused for another usage, 8 resend older than
-- the session replay window (refused: nothing is known of it any more).
--
-- Ledger entry (one per recorded usage, one field "x"):
--   text US decision US reason US policy_version US decided_at_ms [US occurred_at_ms US labels]
-- Recent-decisions trail: one entry per batch, "e" = "b", "x" =
--   policy_version US decided_at_ms, then per decision RS (0x1E) and
--   text US trace_id US decision US reason US retry_after_ms US limits
--   with limits "name,kind,remaining_before,remaining_after,capacity,exceeded(0/1)" joined by
--   ";". The stream is capped (MAXLEN ~) at ceil(ARGV[6] / decisions in the batch) entries,
--   i.e. about ARGV[6] decisions while batch sizes stay alike. Quota threshold crossings
--   (80%, 100%) follow the batch's entry as entries "e" = "th".

redis.replicate_commands()

local ALLOW, THROTTLE, DENY = 1, 2, 3
local OK, RATE_LIMITED, QUOTA_EXHAUSTED, NO_ENTITLEMENT = 1, 2, 3, 4
local AMOUNT_EXCEEDS_CAPACITY, INVALID_USAGE, SUSPENDED, SOFT_LIMIT_EXCEEDED = 5, 7, 8, 9
local MAX_DEBT = 4503599627370496 -- 2^52 sub-units

local stamped = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if stamped > tonumber(ARGV[1]) then
  return {0, stamped}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
local version = ARGV[1]
local dedup_ms = tonumber(ARGV[3])
local session_ms = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local recent_len = tonumber(ARGV[6])
local full_view = ARGV[8] ~= '0'
local payload = cmsgpack.unpack(ARGV[7])
local specs_in, sets_in, batch = payload[1], payload[2], payload[3]

local format, floor, sub, concat = string.format, math.floor, string.sub, table.concat

local function int(x)
  return format('%d', x)
end

local function ceil_div(a, b)
  return floor((a + b - 1) / b)
end

local now_s = int(now)
local DIGIT = {[0] = '0', '1', '2', '3', '4', '5', '6', '7', '8', '9'}

-- #include periods.lua

local function split(s)
  local out = {}
  for part in string.gmatch(s, '[^|]+') do out[#out + 1] = part end
  return out
end

-- Limit states, loaded once per key and written back at the end.
local states = {}

-- A bucket hash holds its level "l" in sub-units of scale "s" at time "t". A plan change can
-- change the scale (a new refill rate): the level is then converted, rounding down, and
-- clamped to the (possibly smaller) capacity.
local function load_rate(idx, cap, refill, scale)
  local st = states[idx]
  if st then return st end
  local v = redis.call('HMGET', KEYS[idx], 'l', 't', 's')
  local level = cap
  if v[1] then
    level = tonumber(v[1])
    local old_scale = tonumber(v[3] or scale)
    if old_scale ~= scale then
      level = floor(level / old_scale * scale)
    end
    local elapsed = now - tonumber(v[2])
    if elapsed < 0 then elapsed = 0 end
    level = math.min(cap, level + elapsed * refill)
  end
  st = {kind = 1, level = level, cap = cap, refill = refill, scale = scale, dirty = false}
  states[idx] = st
  return st
end

-- Grants live in their own hash: id -> "amount|period_start|expires_ms" (0: no expiry).
local function live_grants(idx, start)
  if idx == 0 then return 0 end
  local all = redis.call('HGETALL', KEYS[idx])
  local sum = 0
  for i = 1, #all, 2 do
    local g = split(all[i + 1])
    local exp = tonumber(g[3])
    if tonumber(g[2]) == start and (exp == 0 or exp > now) then
      sum = sum + tonumber(g[1])
    end
  end
  return sum
end

local function load_quota(idx, code, grants_idx)
  local st = states[idx]
  if st then return st end
  local start, finish = period_bounds(now, code)
  local v = redis.call('HMGET', KEYS[idx], 'p', 'u')
  local used = 0
  if v[1] and tonumber(v[1]) == start then
    used = tonumber(v[2] or '0')
  end
  st = {kind = 2, start = start, finish = finish, used = used,
    granted = live_grants(grants_idx, start), dirty = false}
  states[idx] = st
  return st
end

-- Specs, as tables, once per batch; their counter is loaded when a decision first needs it.
local specs = {}
for s = 1, #specs_in / 8 do
  local o = 8 * (s - 1)
  local kind = specs_in[o + 2]
  specs[s] = {idx = specs_in[o + 1], kind = kind, soft = specs_in[o + 3] == 1,
    a = specs_in[o + 4], b = specs_in[o + 5], c = specs_in[o + 6], g = specs_in[o + 7],
    name = specs_in[o + 8], pre = false, st = false, cap = 0, last_v = false, last_s = ''}
end
local sets = {}
for n, members in ipairs(sets_in) do
  local set = {}
  for j, s in ipairs(members) do set[j] = specs[s] end
  sets[n] = set
end

-- The spec's counter, loaded on first use, with its capacity in units (fixed for the batch).
local function bind(spec)
  local st
  if spec.kind == 1 then
    st = load_rate(spec.idx, spec.a, spec.c, spec.b)
    spec.cap = spec.a / spec.b
  else
    st = load_quota(spec.idx, spec.b, spec.g)
    spec.cap = spec.a + st.granted
  end
  spec.st = st
  return st
end

-- "name,kind,", then remaining before and after, then ",capacity,exceeded": the trail's text of
-- a limit
local function trail_texts(spec)
  local cap = int(spec.cap)
  spec.pre = spec.name .. ',' .. DIGIT[spec.kind] .. ','
  spec.cap_x0, spec.cap_x1 = ',' .. cap .. ',0', ',' .. cap .. ',1'
end

local function remaining_of(spec)
  local st = spec.st
  if spec.kind == 1 then return floor(st.level / spec.b) end
  return spec.a + st.granted - st.used
end

-- The text of a remaining amount: the last one of the spec is reused (a usage's "before" is
-- mostly the previous usage's "after").
local function text_of(spec, v)
  if v == spec.last_v then return spec.last_s end
  local s = int(v)
  spec.last_v, spec.last_s = v, s
  return s
end

local sessions = {}        -- session key index -> highest sequence
local sessions_dirty = {}  -- session key index -> true when its header must be written

local function session_hw(idx)
  local hw = sessions[idx]
  if hw == nil then
    local raw = redis.call('GETRANGE', KEYS[idx], 0, 19)
    hw = raw ~= '' and tonumber(raw) or -1
    sessions[idx] = hw
  end
  return hw
end

local SLOT = 65

-- Slots of consecutive sequences are adjacent: they are written as one SETRANGE per run.
-- session key index -> {offset, next sequence, piece count, pieces of the slots...}
local runs = {}

local function flush_run(idx)
  local run = runs[idx]
  if run then
    redis.call('SETRANGE', KEYS[idx], run[1], concat(run, '', 4, 3 + run[3]))
    runs[idx] = nil
  end
end

-- Slot: sequence (20 digits), decision, reason, recorded (1 digit each), retry_after_ms (10
-- digits), decision_id (32 characters, space-padded).
local function write_slot(idx, seq, d, r, rec, retry10, did)
  local run = runs[idx]
  local pos = seq % window
  if not (run and run[2] == seq and pos ~= 0) then
    flush_run(idx)
    run = {20 + pos * SLOT, seq, 0}
    runs[idx] = run
  end
  local n = run[3]
  run[n + 4], run[n + 5], run[n + 6] = format('%020d', seq), d, r
  run[n + 7], run[n + 8], run[n + 9] = rec, retry10, did
  run[2], run[3] = seq + 1, n + 6
end

-- (decision, reason) -> "US decision US reason", and the same with '|'
local dr_texts, dr_bars = {}, {}
local function dr_text(d, r)
  local k = d * 16 + r
  local s = dr_texts[k]
  if not s then
    s = '\31' .. DIGIT[d] .. '\31' .. DIGIT[r]
    dr_texts[k] = s
  end
  return s
end

local agg_fields = {}  -- interval ms -> "<interval start>|<interval ms>"
local ledger_suffix = '\31' .. version .. '\31' .. now_s

local reply = {1, now}
local rn = 2
local trail, tn, ndec = {version .. '\31' .. now_s}, 1, 0
local thresholds = {}
local befores, exceeded, used_before = {}, {}, {}

for o = 0, #batch - 1, 11 do
  local flags, amount, kidx, seq = batch[o + 1], batch[o + 2], batch[o + 3], batch[o + 4]
  local report = flags % 2 == 1
  local entitled = flags % 4 >= 2
  local suspended = flags % 8 >= 4
  local dedup_idx, sess_idx = 0, 0
  if flags >= 8 then sess_idx = kidx else dedup_idx = kidx end
  local fp, did, set_no, agg_ms = batch[o + 5], batch[o + 6], batch[o + 7], batch[o + 8]

  -- 1. A resend: answer from the record, change nothing.
  local rd, rr, rt, rf, rdid = nil, 0, 0, 0, nil
  if dedup_idx > 0 then
    local rec = redis.call('GET', KEYS[dedup_idx])
    if rec then
      local f = split(rec)
      if f[1] ~= fp then
        rd, rr, rt, rf, rdid = DENY, INVALID_USAGE, 0, 4, f[6]
      else
        rd, rr, rt, rf, rdid = tonumber(f[2]), tonumber(f[3]), tonumber(f[4]),
          1 + tonumber(f[5]), f[6]
      end
    end
  elseif sess_idx > 0 and seq <= session_hw(sess_idx) then
    -- Within the window, slot seq % W holds this sequence if it was decided, or an older one
    -- if it never was (e.g. answered degraded, or skipped): then it is decided now, as new.
    -- Beyond the window nothing is known, and guessing could lose or double usage: refuse.
    if session_hw(sess_idx) - seq < window then
      flush_run(sess_idx)
      local off = 20 + (seq % window) * SLOT
      local slot = redis.call('GETRANGE', KEYS[sess_idx], off, off + SLOT - 1)
      if string.len(slot) == SLOT and tonumber(sub(slot, 1, 20)) == seq then
        rd, rr, rt, rf, rdid = tonumber(sub(slot, 21, 21)), tonumber(sub(slot, 22, 22)),
          tonumber(sub(slot, 24, 33)), 1 + tonumber(sub(slot, 23, 23)), sub(slot, 34, 65)
      end
    else
      rd, rr, rt, rf = DENY, INVALID_USAGE, 0, 8
    end
  end

  if rd then
    reply[rn + 1] = rd + 4 * rr + 64 * rf
    reply[rn + 2] = rt
    rn = rn + 2
    if rf % 2 == 1 or rf >= 4 and rf < 8 then
      rn = rn + 1
      reply[rn] = rdid or ''
    end
  else
    local set = nil
    local nl = 0
    local decision, reason, retry = ALLOW, OK, 0
    local take = false

    if not entitled then
      decision, reason = DENY, NO_ENTITLEMENT
    elseif suspended and not report then
      decision, reason = DENY, SUSPENDED
    else
      -- 2. Evaluate every limit.
      if set_no > 0 then
        set = sets[set_no]
        nl = #set
      end
      for j = 1, nl do
        local spec = set[j]
        local st = spec.st or bind(spec)
        if spec.kind == 2 then used_before[j] = st.used end
        befores[j] = remaining_of(spec)
        exceeded[j] = false
      end

      local cap_exceeded, quota_out, soft_crossed = false, false, false
      local rate_wait, quota_wait = 0, 0
      take = report

      if not report then
        for j = 1, nl do
          local spec = set[j]
          local st = spec.st
          local fits, never, wait = true, false, 0
          if spec.kind == 1 then
            local need = amount * spec.b
            if need > spec.a then
              fits, never = false, true
            elseif st.level < need then
              fits, wait = false, ceil_div(need - st.level, spec.c)
            end
          else
            local total = spec.a + st.granted
            if amount > total then
              fits, never = false, true
            elseif total - st.used < amount then
              fits, wait = false, st.finish - now
            end
          end
          if not fits then
            exceeded[j] = true
            if spec.soft then
              soft_crossed = true
            elseif never then
              cap_exceeded = true
            elseif spec.kind == 1 then
              rate_wait = math.max(rate_wait, wait)
            else
              quota_out = true
              quota_wait = math.max(quota_wait, wait)
            end
          end
        end
        take = not (cap_exceeded or quota_out or rate_wait > 0)
      end

      -- 3. Take (admit: only if everything fits) or debit (report: always).
      if take then
        for j = 1, nl do
          local spec = set[j]
          local st = spec.st
          if spec.kind == 1 then
            st.level = math.max(st.level - amount * spec.b, -MAX_DEBT)
          else
            st.used = st.used + amount
          end
          st.dirty = true
        end
      end

      if report then
        for j = 1, nl do
          local spec = set[j]
          local st = spec.st
          if spec.kind == 1 then
            if st.level < 0 then
              exceeded[j] = true
              if spec.soft then soft_crossed = true
              else rate_wait = math.max(rate_wait, ceil_div(-st.level, spec.c)) end
            end
          else
            local rem = spec.a + st.granted - st.used
            if spec.soft and rem < 0 then
              exceeded[j], soft_crossed = true, true
            elseif not spec.soft and rem <= 0 then
              exceeded[j], quota_out = true, true
              quota_wait = math.max(quota_wait, st.finish - now)
            end
          end
        end
      end

      if suspended then
        decision, reason = DENY, SUSPENDED
      elseif cap_exceeded then
        decision, reason = DENY, AMOUNT_EXCEEDS_CAPACITY
      elseif quota_out then
        decision, reason, retry = DENY, QUOTA_EXHAUSTED, quota_wait
      elseif rate_wait > 0 then
        decision, reason, retry = THROTTLE, RATE_LIMITED, rate_wait
      elseif soft_crossed then
        reason = SOFT_LIMIT_EXCEEDED
      end
    end
    local recorded = take and 2 or 0
    local text = batch[o + 9]
    local retry_s = retry == 0 and '0' or int(retry)

    -- 4. Ledger entry (or aggregate) and dedup record, in the same step as the debits.
    if take then
      if agg_ms > 0 then
        local field = agg_fields[agg_ms]
        if not field then
          field = int(now - now % agg_ms) .. '|' .. int(agg_ms)
          agg_fields[agg_ms] = field
        end
        field = field .. batch[o + 10]
        redis.call('HINCRBY', KEYS[4], field .. '|a', amount)
        redis.call('HINCRBY', KEYS[4], field .. '|n', 1)
      else
        redis.call('XADD', KEYS[2], '*', 'x',
          text .. dr_text(decision, reason) .. ledger_suffix .. batch[o + 10])
      end
    end
    if entitled then
      if dedup_idx > 0 then
        redis.call('SET', KEYS[dedup_idx], fp .. '|' .. DIGIT[decision] .. '|' .. DIGIT[reason]
          .. '|' .. retry_s .. '|' .. DIGIT[recorded] .. '|' .. did, 'PX', dedup_ms)
      elseif sess_idx > 0 then
        local padded = did
        if string.len(did) ~= 32 then padded = format('%-32s', did) end
        local retry10 = '0000000000'
        if retry > 0 then retry10 = format('%010d', math.min(retry, 9999999999)) end
        write_slot(sess_idx, seq, DIGIT[decision], DIGIT[reason], DIGIT[recorded], retry10,
          padded)
        if seq > session_hw(sess_idx) then
          sessions[sess_idx] = seq
        end
        sessions_dirty[sess_idx] = true
      end
    end

    -- 5. The recent-decisions trail: levels before and after, and quota thresholds crossed.
    --    The reply: code, retry, and per limit remaining, reset (and a quota's capacity).
    --    In the basic view, a decision with reason OK replies no limits.
    local with_limits = full_view or reason ~= OK
    reply[rn + 1] = decision + 4 * reason + 64 * recorded + 1024 * (with_limits and nl or 0)
    reply[rn + 2] = retry
    rn = rn + 2
    if recent_len > 0 then
      -- the pieces of the batch's trail entry, joined once at the end
      ndec = ndec + 1
      trail[tn + 1], trail[tn + 2], trail[tn + 3], trail[tn + 4] = '\30', text, '\31', batch[o + 11]
      trail[tn + 5], trail[tn + 6], trail[tn + 7] = dr_text(decision, reason), '\31', retry_s
      trail[tn + 8] = '\31'
      tn = tn + 8
    end
    for j = 1, nl do
      local spec = set[j]
      local st = spec.st
      local after = remaining_of(spec)
      if with_limits then
        local reset = 0
        if spec.kind == 1 then
          if st.level < spec.a then reset = ceil_div(spec.a - st.level, spec.c) end
        else
          reset = st.finish - now
        end
        reply[rn + 1] = after
        if exceeded[j] then reply[rn + 2] = -1 - reset else reply[rn + 2] = reset end
        rn = rn + 2
        if spec.kind == 2 then
          rn = rn + 1
          reply[rn] = spec.cap
        end
      end
      if recent_len > 0 then
        if not spec.pre then trail_texts(spec) end
        if j > 1 then
          tn = tn + 1
          trail[tn] = ';'
        end
        trail[tn + 1], trail[tn + 2], trail[tn + 3] = spec.pre, text_of(spec, befores[j]), ','
        trail[tn + 4] = text_of(spec, after)
        if exceeded[j] then trail[tn + 5] = spec.cap_x1 else trail[tn + 5] = spec.cap_x0 end
        tn = tn + 5
        if take and spec.kind == 2 then
          local total = spec.a + st.granted
          local thr80, thr100 = total * 80 / 100, total * 100 / 100
          if used_before[j] < thr80 and st.used >= thr80 then
            thresholds[#thresholds + 1] = {spec.name, text, 80, st.used, total}
          end
          if used_before[j] < thr100 and st.used >= thr100 then
            thresholds[#thresholds + 1] = {spec.name, text, 100, st.used, total}
          end
        end
      end
    end
  end
end

for idx, _ in pairs(runs) do
  flush_run(idx)
end

if ndec > 0 then
  local keep = math.ceil(recent_len / ndec)
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', keep, '*', 'e', 'b', 'x', concat(trail, '', 1, tn))
  for _, th in ipairs(thresholds) do
    local slice, key = string.match(th[2], '^[^\31]*\31[^\31]*\31([^\31]*)\31([^\31]*)\31')
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', keep, '*', 'e', 'th', 'l', th[1], 'sl', slice,
      'k', key, 'pc', th[3], 'u', int(th[4]), 'c', int(th[5]), 'ts', now_s)
  end
end

-- 6. Write back every limit that changed. A full bucket is deleted: idle subjects cost nothing.
for idx, st in pairs(states) do
  if st.dirty then
    if st.kind == 1 then
      if st.level >= st.cap then
        redis.call('DEL', KEYS[idx])
      else
        redis.call('HSET', KEYS[idx], 'l', int(st.level), 't', now_s, 's', int(st.scale))
        redis.call('PEXPIRE', KEYS[idx], ceil_div(st.cap - st.level, st.refill))
      end
    else
      redis.call('HSET', KEYS[idx], 'p', int(st.start), 'u', int(st.used))
      redis.call('PEXPIRE', KEYS[idx], st.finish - now + HOUR)
    end
  end
end

for idx, _ in pairs(sessions_dirty) do
  redis.call('SETRANGE', KEYS[idx], 0, format('%020d', sessions[idx]))
  redis.call('PEXPIRE', KEYS[idx], session_ms)
end

return reply
