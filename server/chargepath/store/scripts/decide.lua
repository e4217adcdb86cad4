-- decide.lua: decide a batch of usages of ONE tenant, atomically, on Redis' clock.
--
-- Invariants kept (DESIGN properties 1-3):
--  * All-or-nothing admit: units are taken from every matching limit, or from none.
--  * A report is always debited (a bucket may go into debt) and recorded.
--  * The dedup record (request id or session sequence), the debits and the ledger entry are
--    written in this one script, so an id is never marked seen unless its effect is written.
--  * Time is Redis TIME (+ ARGV clock offset, 0 outside tests); all amounts are integers.
--    Lua numbers are doubles: every value here stays below 2^53 (checked by the gateway).
--
-- KEYS[1]  tenant entitlement hash ("v" = policy version stamped by the last publish)
-- KEYS[2]  tenant ledger stream
-- KEYS[3..] dedup, session, bucket and quota keys, referenced by index from ARGV
--
-- ARGV[1] policy version the gateway decided with
-- ARGV[2] clock offset, ms
-- ARGV[3] dedup window, ms
-- ARGV[4] session ttl, ms
-- ARGV[5] session replay window W (slots kept per session)
-- ARGV[6] number of usages n; then, per usage, 14 fields:
--   flags (1 = report, 2 = entitled), amount, request_id, decision_id, fingerprint,
--   dedup key index (0: none), session key index (0: none), sequence, slice, key, metric,
--   labels (JSON, may be empty), occurred_at ms (0: unknown), number of limits L;
--   then, per limit, 6 fields:
--   key index, kind (1 rate, 2 quota), soft (0/1),
--   rate: capacity in sub-units, sub-units per unit, refill in sub-units per ms
--   quota: amount in units, period (1 hour, 2 day, 3 month), 0
--
-- Reply: {0, stamped_version} when the tenant's stamped version is newer than ARGV[1] (the
-- gateway reloads the policy and retries; nothing was written), else
-- {1, now_ms, then per usage: decision, reason, retry_after_ms, flags, decision_id, L,
--  then per limit: remaining units, capacity units, reset_after_ms, exceeded (0/1)}.
-- flags: 1 replayed, 2 recorded, 4 request_id reused for another usage, 8 resend older than
-- the session replay window.

redis.replicate_commands()

local ALLOW, THROTTLE, DENY = 1, 2, 3
local OK, RATE_LIMITED, QUOTA_EXHAUSTED, NO_ENTITLEMENT = 1, 2, 3, 4
local AMOUNT_EXCEEDS_CAPACITY, SOFT_LIMIT_EXCEEDED = 5, 9
local MAX_DEBT = 4503599627370496 -- 2^52 sub-units
local HOUR, DAY = 3600000, 86400000

local stamped = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if stamped > tonumber(ARGV[1]) then
  return {0, stamped}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
local dedup_ms = tonumber(ARGV[3])
local session_ms = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local n = tonumber(ARGV[6])

local function fmt(x)
  return string.format('%.0f', x)
end

local function ceil_div(a, b)
  return math.floor((a + b - 1) / b)
end

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m
end

-- [start, end) of the UTC period containing now
local function period_bounds(code)
  if code == 1 then
    local s = now - now % HOUR
    return s, s + HOUR
  elseif code == 2 then
    local s = now - now % DAY
    return s, s + DAY
  end
  local y, m = civil_from_days(math.floor(now / DAY))
  local s = days_from_civil(y, m, 1) * DAY
  if m == 12 then y, m = y + 1, 1 else m = m + 1 end
  return s, days_from_civil(y, m, 1) * DAY
end

-- Limit states, loaded once per key and written back at the end.
local states = {}

local function load_rate(idx, cap, refill)
  local st = states[idx]
  if st then return st end
  local v = redis.call('HMGET', KEYS[idx], 'l', 't')
  local level = cap
  if v[1] then
    local elapsed = now - tonumber(v[2])
    if elapsed < 0 then elapsed = 0 end
    level = math.min(cap, tonumber(v[1]) + elapsed * refill)
  end
  st = {kind = 1, level = level, cap = cap, refill = refill, dirty = false}
  states[idx] = st
  return st
end

local function load_quota(idx, code)
  local st = states[idx]
  if st then return st end
  local start, finish = period_bounds(code)
  local v = redis.call('HMGET', KEYS[idx], 'p', 'u', 'g')
  local used, granted = 0, 0
  if v[1] and tonumber(v[1]) == start then
    used = tonumber(v[2] or '0')
    granted = tonumber(v[3] or '0')
  end
  st = {kind = 2, start = start, finish = finish, used = used, granted = granted, dirty = false}
  states[idx] = st
  return st
end

local sessions = {}

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

local function split(s)
  local out = {}
  for part in string.gmatch(s, '[^|]+') do out[#out + 1] = part end
  return out
end

local reply = {1, now}
local ledger_key = KEYS[2]
local p = 7

for _ = 1, n do
  local flags = tonumber(ARGV[p])
  local report = flags % 2 == 1
  local entitled = math.floor(flags / 2) % 2 == 1
  local amount = tonumber(ARGV[p + 1])
  local rid = ARGV[p + 2]
  local did = ARGV[p + 3]
  local fp = ARGV[p + 4]
  local dedup_idx = tonumber(ARGV[p + 5])
  local sess_idx = tonumber(ARGV[p + 6])
  local seq = tonumber(ARGV[p + 7])
  local nl = tonumber(ARGV[p + 13])
  local lp = p + 14
  local usage_p = p
  p = lp + nl * 6

  -- 1. A resend: answer from the record, change nothing.
  local replay = nil
  if dedup_idx > 0 then
    local rec = redis.call('GET', KEYS[dedup_idx])
    if rec then
      local f = split(rec)
      if f[1] ~= fp then
        replay = {DENY, 7, 0, 4, f[6]}
      else
        replay = {tonumber(f[2]), tonumber(f[3]), tonumber(f[4]), 1 + tonumber(f[5]), f[6]}
      end
    end
  elseif sess_idx > 0 and seq <= session_hw(sess_idx) then
    local off = 20 + (seq % window) * SLOT
    local slot = redis.call('GETRANGE', KEYS[sess_idx], off, off + SLOT - 1)
    if string.len(slot) == SLOT and tonumber(string.sub(slot, 1, 20)) == seq then
      replay = {tonumber(string.sub(slot, 21, 21)), tonumber(string.sub(slot, 22, 22)),
        tonumber(string.sub(slot, 24, 33)), 1 + tonumber(string.sub(slot, 23, 23)),
        string.sub(slot, 34, 65)}
    else
      replay = {ALLOW, OK, 0, 1 + 2 + 8, ''}
    end
  end

  if replay then
    for k = 1, 5 do reply[#reply + 1] = replay[k] end
    reply[#reply + 1] = 0
  elseif not entitled then
    for _, v in ipairs({DENY, NO_ENTITLEMENT, 0, 0, did, 0}) do reply[#reply + 1] = v end
  else
    -- 2. Evaluate every limit.
    local lims = {}
    for j = 0, nl - 1 do
      local q = lp + j * 6
      local lim = {idx = tonumber(ARGV[q]) + 0, kind = tonumber(ARGV[q + 1]),
        soft = ARGV[q + 2] == '1', a = tonumber(ARGV[q + 3]), b = tonumber(ARGV[q + 4]),
        c = tonumber(ARGV[q + 5]), exceeded = false}
      if lim.kind == 1 then
        lim.st = load_rate(lim.idx, lim.a, lim.c)
      else
        lim.st = load_quota(lim.idx, lim.b)
      end
      lims[#lims + 1] = lim
    end

    local cap_exceeded, quota_out, soft_crossed = false, false, false
    local rate_wait, quota_wait = 0, 0
    local take = report

    if not report then
      for _, lim in ipairs(lims) do
        local st = lim.st
        local fits, never = true, false
        local wait = 0
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

    local decision, reason, retry = ALLOW, OK, 0
    if cap_exceeded then
      decision, reason = DENY, AMOUNT_EXCEEDS_CAPACITY
    elseif quota_out then
      decision, reason, retry = DENY, QUOTA_EXHAUSTED, quota_wait
    elseif rate_wait > 0 then
      decision, reason, retry = THROTTLE, RATE_LIMITED, rate_wait
    elseif soft_crossed then
      reason = SOFT_LIMIT_EXCEEDED
    end
    local recorded = take and 2 or 0

    -- 4. Ledger entry and dedup record, in the same step as the debits.
    if take then
      local entry = {'rid', rid, 'did', did, 'm', ARGV[usage_p + 10], 'a', fmt(amount),
        'mo', report and 'report' or 'admit', 'd', decision, 'r', reason, 'ts', fmt(now)}
      if ARGV[usage_p + 8] ~= '' then
        entry[#entry + 1] = 'sl'; entry[#entry + 1] = ARGV[usage_p + 8]
      end
      if ARGV[usage_p + 9] ~= '' then
        entry[#entry + 1] = 'k'; entry[#entry + 1] = ARGV[usage_p + 9]
      end
      if ARGV[usage_p + 11] ~= '' then
        entry[#entry + 1] = 'lb'; entry[#entry + 1] = ARGV[usage_p + 11]
      end
      if ARGV[usage_p + 12] ~= '0' then
        entry[#entry + 1] = 'oc'; entry[#entry + 1] = ARGV[usage_p + 12]
      end
      redis.call('XADD', ledger_key, '*', unpack(entry))
    end
    if dedup_idx > 0 then
      redis.call('SET', KEYS[dedup_idx],
        table.concat({fp, decision, reason, fmt(retry), recorded, did}, '|'), 'PX', dedup_ms)
    elseif sess_idx > 0 then
      local off = 20 + (seq % window) * SLOT
      local slot = string.format('%020.0f%d%d%d%010.0f%-32s', seq, decision, reason, recorded,
        math.min(retry, 9999999999), did)
      redis.call('SETRANGE', KEYS[sess_idx], off, slot)
      redis.call('SETRANGE', KEYS[sess_idx], 0, string.format('%020.0f', seq))
      redis.call('PEXPIRE', KEYS[sess_idx], session_ms)
      sessions[sess_idx] = seq
    end

    for _, v in ipairs({decision, reason, retry, recorded, did, #lims}) do
      reply[#reply + 1] = v
    end
    for _, lim in ipairs(lims) do
      local st = lim.st
      local remaining, capacity, reset
      if lim.kind == 1 then
        remaining = math.floor(st.level / lim.b)
        capacity = lim.a / lim.b
        reset = st.level >= lim.a and 0 or ceil_div(lim.a - st.level, lim.c)
      else
        capacity = lim.a + st.granted
        remaining = capacity - st.used
        reset = st.finish - now
      end
      reply[#reply + 1] = remaining
      reply[#reply + 1] = capacity
      reply[#reply + 1] = reset
      reply[#reply + 1] = lim.exceeded and 1 or 0
    end
  end
end

-- 5. Write back every limit that changed. A full bucket is deleted: idle subjects cost nothing.
for idx, st in pairs(states) do
  if st.dirty then
    if st.kind == 1 then
      if st.level >= st.cap then
        redis.call('DEL', KEYS[idx])
      else
        redis.call('HSET', KEYS[idx], 'l', fmt(st.level), 't', fmt(now))
        redis.call('PEXPIRE', KEYS[idx], ceil_div(st.cap - st.level, st.refill))
      end
    else
      redis.call('HSET', KEYS[idx], 'p', fmt(st.start), 'u', fmt(st.used), 'g', fmt(st.granted))
      redis.call('PEXPIRE', KEYS[idx], st.finish - now + HOUR)
    end
  end
end

return reply
