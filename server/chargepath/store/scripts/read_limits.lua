-- read_limits.lua: the live counters of a subject's limits, for the admin API's state.
--
-- Invariant: reads only. A counter is read with decide.lua's own rules, from the same
-- libraries (lib/bucket.lua: refill, scale conversion, clamp; lib/quota.lua: period reset,
-- live grants), on Redis' clock (+ the clock offset, 0 outside tests): what it shows is what
-- the next decision would start from, and no copy of those rules exists in Python.
--
-- KEYS[1]   the tenant's grant notes hash (grant id -> note)
-- KEYS[2..] the counters, and each quota's grants hash, by index from the specs
--
-- ARGV[1]   clock offset, ms
-- ARGV[2]   MessagePack array of limit specs, flat, SPEC_SLOTS values each (lib/specs.lua)
--
-- Reply: {now_ms, then per spec: remaining, capacity, used, granted, reset_after_ms (units,
-- ms; a rate's used and granted are 0), G, then G times: grant id, amount, expires_at_ms (0:
-- end of period), note} with G the live grants of a quota (0 for a rate).

-- #include lib/numbers.lua
-- #include lib/specs.lua
-- #include lib/bucket.lua
-- #include lib/quota.lua

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local specs_in = cmsgpack.unpack(ARGV[2])

local reply = {now}
local n = 1
for o = 0, #specs_in - 1, SPEC_SLOTS do
  local spec = read_spec(specs_in, o)
  local key = KEYS[spec.idx]
  if spec.kind == KIND_RATE then
    local level = bucket_read(key, spec, now)
    reply[n + 1], reply[n + 2], reply[n + 3] = floor(level / spec.scale), spec.capacity, 0
    reply[n + 4] = 0
    reply[n + 5] = bucket_wait(spec.capacity_sub, level, spec.refill_per_ms)
    reply[n + 6] = 0
    n = n + 6
  else
    local start, finish, used = quota_read(key, spec.period, now)
    local live = {}
    local granted = quota_grants(KEYS[spec.grants_idx], start, now, live)
    local capacity = spec.amount + granted
    reply[n + 1], reply[n + 2], reply[n + 3] = capacity - used, capacity, used
    reply[n + 4], reply[n + 5], reply[n + 6] = granted, finish - now, #live / 3
    n = n + 6
    for i = 1, #live, 3 do
      reply[n + 1], reply[n + 2], reply[n + 3] = live[i], live[i + 1], live[i + 2]
      reply[n + 4] = redis.call('HGET', KEYS[1], live[i]) or ''
      n = n + 4
    end
  end
end
return reply
