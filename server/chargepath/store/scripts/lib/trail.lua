-- trail.lua: the recent-decisions trail (`-- #include lib/trail.lua`); read back by
-- chargepath/store/admin.py for state, explain and watch.
--
-- One entry per batch, "e" = "b", "x" = policy_version US decided_at_ms, then per decision RS
-- and
--   text US trace_id US decision US reason US retry_after_ms US limits
-- with limits "name,kind,remaining_before,remaining_after,capacity,exceeded(0/1)" joined by
-- ";". The stream keeps every entry of the last `keep_ms` (the dedup window, so a decision id
-- can be explained for at least that long, whatever the tenant's rate) and, beyond it, at most
-- ceil(length / decisions in the batch) entries, i.e. about `length` decisions while batch
-- sizes stay alike: once it holds more, the entries older than the window go (MINID ~, whole
-- stream nodes). Entry ids are Redis' TIME. Quota threshold crossings
-- (QUOTA_WARN_PERCENT, 100) follow the batch's entry as entries "e" = "th".
-- The entry is built as pieces, joined once: no string is concatenated per decision.

-- #include lib/numbers.lua

local trail, tn, ndec = {}, 0, 0
local thresholds = {}

local function trail_open(version, now_s)
  trail[1], tn = version .. US .. now_s, 1
end

-- The text of a remaining amount: the last one of the spec is reused (a usage's "before" is
-- mostly the previous usage's "after").
local function remaining_text(spec, v)
  if v == spec.last_v then return spec.last_s end
  local s = int(v)
  spec.last_v, spec.last_s = v, s
  return s
end

-- One decision, with its limits `set[1..nl]`: remaining units `befores[j]` before and
-- `afters[j]` after, exceeded or not. When the usage was taken, a quota that went from
-- `used_before[j]` units to its used units now crossed a threshold or not; `subject`: the
-- usage's subject number (see decide.lua).
local function trail_decision(text, trace_id, d, r, retry_s, set, nl, befores, afters,
    exceeded, taken, used_before, subject)
  local pieces, n = trail, tn
  ndec = ndec + 1
  pieces[n + 1], pieces[n + 2], pieces[n + 3], pieces[n + 4] = RS, text, US, trace_id
  pieces[n + 5], pieces[n + 6], pieces[n + 7] = verdict_text(d, r), US, retry_s
  pieces[n + 8] = US
  n = n + 8
  for j = 1, nl do
    local spec = set[j]
    if not spec.pre then
      -- "name,kind," and ",capacity,exceeded", once per spec (the capacity is the batch's)
      local cap = int(spec.capacity)
      spec.pre = spec.name .. ',' .. DIGIT[spec.kind] .. ','
      spec.cap_x0, spec.cap_x1 = ',' .. cap .. ',0', ',' .. cap .. ',1'
    end
    if j > 1 then
      n = n + 1
      pieces[n] = ';'
    end
    pieces[n + 1], pieces[n + 2], pieces[n + 3] = spec.pre, remaining_text(spec, befores[j]), ','
    pieces[n + 4] = remaining_text(spec, afters[j])
    if exceeded[j] then pieces[n + 5] = spec.cap_x1 else pieces[n + 5] = spec.cap_x0 end
    n = n + 5
    if taken and spec.kind == KIND_QUOTA then
      local total, used, was = spec.capacity, spec.st.used, used_before[j]
      local warn, full = total * QUOTA_WARN_PERCENT / 100, total * 100 / 100
      if was < warn and used >= warn then
        thresholds[#thresholds + 1] = {spec.name, subject, QUOTA_WARN_PERCENT, used, total}
      end
      if was < full and used >= full then
        thresholds[#thresholds + 1] = {spec.name, subject, 100, used, total}
      end
    end
  end
  tn = n
end

-- Write the batch's entry and its threshold events to the trail stream `key`; `subjects`:
-- flat (slice, key) pairs by subject number; `real_now`: Redis' TIME in ms (the entry ids'
-- clock), `keep_ms`: how long every entry is kept.
local function trail_close(key, length, subjects, now_s, real_now, keep_ms)
  if ndec == 0 then return end
  local keep = math.ceil(length / ndec)
  redis.call('XADD', key, '*', 'e', 'b', 'x', concat(trail, '', 1, tn))
  for _, th in ipairs(thresholds) do
    redis.call('XADD', key, '*', 'e', 'th', 'l', th[1],
      'sl', subjects[2 * th[2] - 1], 'k', subjects[2 * th[2]], 'pc', th[3], 'u', int(th[4]),
      'c', int(th[5]), 'ts', now_s)
  end
  if redis.call('XLEN', key) > keep then
    redis.call('XTRIM', key, 'MINID', '~', real_now - keep_ms)
  end
end
