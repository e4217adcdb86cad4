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
-- ARGV[6] recent-decisions stream length (approximate MAXLEN; 0: not kept)
-- ARGV[7] the usages, MessagePack: an array with, per usage, an array of 16 fields:
--   flags (1 report, 2 entitled, 4 suspended), amount, request_id, decision_id, fingerprint,
--   dedup key index (0: none), session key index (0: none), sequence, slice, key, metric,
--   labels (JSON, may be empty), occurred_at ms (0: unknown), trace id, ledger aggregation
--   interval ms (0: one ledger entry per usage), limits: an array with, per limit, 8 fields:
--   key index, kind (1 rate, 2 quota), soft (0/1),
--     rate:  capacity in sub-units, sub-units per unit, refill in sub-units per ms, 0
--     quota: amount in units, period (1 hour, 2 day, 3 month), 0, grants key index
--   name
--   (one MessagePack argument instead of thousands: packing and parsing them dominated)
--
-- Reply: {0, stamped_version} when the tenant's stamp is newer than ARGV[1] (nothing written),
-- else {1, now_ms, then per usage: decision, reason, retry_after_ms, flags, decision_id, L,
--  then per limit: remaining units, capacity units, reset_after_ms, exceeded (0/1)}.
-- flags: 1 replayed, 2 recorded, 4 request_id reused for another usage, 8 resend older than
-- the session replay window (refused: nothing is known of it any more).

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
local batch = cmsgpack.unpack(ARGV[7])

local function fmt(x)
  return string.format('%.0f', x)
end

local function ceil_div(a, b)
  return math.floor((a + b - 1) / b)
end

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
      level = math.floor(level / old_scale * scale)
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

local function remaining_of(lim)
  local st = lim.st
  if lim.kind == 1 then return math.floor(st.level / lim.b) end
  return lim.a + st.granted - st.used
end

local function capacity_of(lim)
  if lim.kind == 1 then return lim.a / lim.b end
  return lim.a + lim.st.granted
end

local reply = {1, now}

for _, u in ipairs(batch) do
  local flags = u[1]
  local report = flags % 2 == 1
  local entitled = math.floor(flags / 2) % 2 == 1
  local suspended = math.floor(flags / 4) % 2 == 1
  local amount, rid, did, fp = u[2], u[3], u[4], u[5]
  local dedup_idx, sess_idx, seq = u[6], u[7], u[8]
  local slice, key, metric = u[9], u[10], u[11]
  local labels, occurred, trace_id = u[12], u[13], u[14]
  local agg_ms = u[15]
  local limit_specs = u[16]

  -- 1. A resend: answer from the record, change nothing.
  local replay = nil
  if dedup_idx > 0 then
    local rec = redis.call('GET', KEYS[dedup_idx])
    if rec then
      local f = split(rec)
      if f[1] ~= fp then
        replay = {DENY, INVALID_USAGE, 0, 4, f[6]}
      else
        replay = {tonumber(f[2]), tonumber(f[3]), tonumber(f[4]), 1 + tonumber(f[5]), f[6]}
      end
    end
  elseif sess_idx > 0 and seq <= session_hw(sess_idx) then
    -- Within the window, slot seq % W holds this sequence if it was decided, or an older one
    -- if it never was (e.g. answered degraded, or skipped): then it is decided now, as new.
    -- Beyond the window nothing is known, and guessing could lose or double usage: refuse.
    if session_hw(sess_idx) - seq < window then
      local off = 20 + (seq % window) * SLOT
      local slot = redis.call('GETRANGE', KEYS[sess_idx], off, off + SLOT - 1)
      if string.len(slot) == SLOT and tonumber(string.sub(slot, 1, 20)) == seq then
        replay = {tonumber(string.sub(slot, 21, 21)), tonumber(string.sub(slot, 22, 22)),
          tonumber(string.sub(slot, 24, 33)), 1 + tonumber(string.sub(slot, 23, 23)),
          string.sub(slot, 34, 65)}
      end
    else
      replay = {DENY, INVALID_USAGE, 0, 8, did}
    end
  end

  if replay then
    for k = 1, 5 do reply[#reply + 1] = replay[k] end
    reply[#reply + 1] = 0
  else
    local lims = {}
    local decision, reason, retry = ALLOW, OK, 0
    local take = false

    if not entitled then
      decision, reason = DENY, NO_ENTITLEMENT
    elseif suspended and not report then
      decision, reason = DENY, SUSPENDED
    else
      -- 2. Evaluate every limit.
      for _, spec in ipairs(limit_specs) do
        local lim = {idx = spec[1], kind = spec[2], soft = spec[3] == 1, a = spec[4],
          b = spec[5], c = spec[6], name = spec[8], exceeded = false}
        if lim.kind == 1 then
          lim.st = load_rate(lim.idx, lim.a, lim.c, lim.b)
        else
          lim.st = load_quota(lim.idx, lim.b, spec[7])
          lim.used_before = lim.st.used
        end
        lim.before = remaining_of(lim)
        lims[#lims + 1] = lim
      end

      local cap_exceeded, quota_out, soft_crossed = false, false, false
      local rate_wait, quota_wait = 0, 0
      take = report

      if not report then
        for _, lim in ipairs(lims) do
          local st = lim.st
          local fits, never, wait = true, false, 0
          if lim.kind == 1 then
            local need = amount * lim.b
            if need > lim.a then
              fits, never = false, true
            elseif st.level < need then
              fits, wait = false, ceil_div(need - st.level, lim.c)
            end
          else
            local total = lim.a + st.granted
            if amount > total then
              fits, never = false, true
            elseif total - st.used < amount then
              fits, wait = false, st.finish - now
            end
          end
          if not fits then
            lim.exceeded = true
            if lim.soft then
              soft_crossed = true
            elseif never then
              cap_exceeded = true
            elseif lim.kind == 1 then
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
        for _, lim in ipairs(lims) do
          local st = lim.st
          if lim.kind == 1 then
            st.level = math.max(st.level - amount * lim.b, -MAX_DEBT)
          else
            st.used = st.used + amount
          end
          st.dirty = true
        end
      end

      if report then
        for _, lim in ipairs(lims) do
          local st = lim.st
          if lim.kind == 1 and st.level < 0 then
            lim.exceeded = true
            if lim.soft then soft_crossed = true
            else rate_wait = math.max(rate_wait, ceil_div(-st.level, lim.c)) end
          elseif lim.kind == 2 then
            local rem = lim.a + st.granted - st.used
            if lim.soft and rem < 0 then
              lim.exceeded, soft_crossed = true, true
            elseif not lim.soft and rem <= 0 then
              lim.exceeded, quota_out = true, true
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
    local mode = report and 'report' or 'admit'

    -- 4. Ledger entry (or aggregate) and dedup record, in the same step as the debits.
    if take then
      if agg_ms > 0 then
        local field = table.concat({fmt(now - now % agg_ms), fmt(agg_ms), slice, key, metric,
          mode}, '|')
        redis.call('HINCRBY', KEYS[4], field .. '|a', amount)
        redis.call('HINCRBY', KEYS[4], field .. '|n', 1)
      else
        local entry = {'rid', rid, 'did', did, 'm', metric, 'a', fmt(amount), 'mo', mode,
          'd', decision, 'r', reason, 'v', version, 'ts', fmt(now)}
        if slice ~= '' then entry[#entry + 1] = 'sl'; entry[#entry + 1] = slice end
        if key ~= '' then entry[#entry + 1] = 'k'; entry[#entry + 1] = key end
        if labels ~= '' then entry[#entry + 1] = 'lb'; entry[#entry + 1] = labels end
        if occurred ~= 0 then entry[#entry + 1] = 'oc'; entry[#entry + 1] = fmt(occurred) end
        redis.call('XADD', KEYS[2], '*', unpack(entry))
      end
    end
    if entitled then
      if dedup_idx > 0 then
        redis.call('SET', KEYS[dedup_idx],
          table.concat({fp, decision, reason, fmt(retry), recorded, did}, '|'), 'PX', dedup_ms)
      elseif sess_idx > 0 then
        local off = 20 + (seq % window) * SLOT
        local slot = string.format('%020.0f%d%d%d%010.0f%-32s', seq, decision, reason, recorded,
          math.min(retry, 9999999999), did)
        redis.call('SETRANGE', KEYS[sess_idx], off, slot)
        if seq > session_hw(sess_idx) then
          sessions[sess_idx] = seq
        end
        sessions_dirty[sess_idx] = true
      end
    end

    -- 5. The recent-decisions trail: levels before and after, and quota thresholds crossed.
    if recent_len > 0 then
      local packed = {}
      for _, lim in ipairs(lims) do
        packed[#packed + 1] = table.concat({lim.name, lim.kind, fmt(lim.before),
          fmt(remaining_of(lim)), fmt(capacity_of(lim)), lim.exceeded and 1 or 0}, ',')
      end
      -- one packed field (0x1F-separated; no field may hold 0x1F): a stream entry with two
      -- fields costs a fraction of one with fifteen
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', recent_len, '*', 'e', 'd', 'x',
        table.concat({did, rid, slice, key, metric, fmt(amount), mode, decision, reason, version,
          fmt(now), trace_id, fmt(retry), table.concat(packed, ';')}, '\31'))
      if take then
        for _, lim in ipairs(lims) do
          if lim.kind == 2 then
            local total = lim.a + lim.st.granted
            for _, pct in ipairs({80, 100}) do
              local thr = total * pct / 100
              if lim.used_before < thr and lim.st.used >= thr then
                redis.call('XADD', KEYS[3], 'MAXLEN', '~', recent_len, '*', 'e', 'th',
                  'l', lim.name, 'sl', slice, 'k', key, 'pc', pct, 'u', fmt(lim.st.used),
                  'c', fmt(total), 'ts', fmt(now))
              end
            end
          end
        end
      end
    end

    for _, v in ipairs({decision, reason, retry, recorded, did, #lims}) do
      reply[#reply + 1] = v
    end
    for _, lim in ipairs(lims) do
      local st = lim.st
      local reset
      if lim.kind == 1 then
        reset = st.level >= lim.a and 0 or ceil_div(lim.a - st.level, lim.c)
      else
        reset = st.finish - now
      end
      reply[#reply + 1] = remaining_of(lim)
      reply[#reply + 1] = capacity_of(lim)
      reply[#reply + 1] = reset
      reply[#reply + 1] = lim.exceeded and 1 or 0
    end
  end
end

-- 6. Write back every limit that changed. A full bucket is deleted: idle subjects cost nothing.
for idx, st in pairs(states) do
  if st.dirty then
    if st.kind == 1 then
      if st.level >= st.cap then
        redis.call('DEL', KEYS[idx])
      else
        redis.call('HSET', KEYS[idx], 'l', fmt(st.level), 't', fmt(now), 's', fmt(st.scale))
        redis.call('PEXPIRE', KEYS[idx], ceil_div(st.cap - st.level, st.refill))
      end
    else
      redis.call('HSET', KEYS[idx], 'p', fmt(st.start), 'u', fmt(st.used))
      redis.call('PEXPIRE', KEYS[idx], st.finish - now + HOUR)
    end
  end
end

for idx, _ in pairs(sessions_dirty) do
  redis.call('SETRANGE', KEYS[idx], 0, string.format('%020.0f', sessions[idx]))
  redis.call('PEXPIRE', KEYS[idx], session_ms)
end

return reply
