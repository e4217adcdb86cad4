-- grant.lua: top up a quota counter for its current period.
--
-- KEYS[1]  the counter's grants hash: grant id -> "amount|period_start_ms|expires_ms"
-- KEYS[2]  the quota counter hash (p period start, u used), read only
-- ARGV[1]  grant id      ARGV[2] amount (units)     ARGV[3] expires at, ms (0: end of period)
-- ARGV[4]  period (1 hour, 2 day, 3 month)           ARGV[5] clock offset, ms
-- ARGV[6]  the quota's amount per period (units)
-- Reply:   {capacity, remaining, now_ms}, or {-1, now_ms} if the expiry is already past
-- Invariant: a grant counts only in the period it was made in, and only until it expires;
-- grants of past periods and expired grants are removed here, so the hash stays small.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[5])
local expires = tonumber(ARGV[3])
if expires ~= 0 and expires <= now then
  return {-1, now}
end

-- #include periods.lua

local code = tonumber(ARGV[4])
local start, finish = period_bounds(now, code)

local granted = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local f = {}
  for part in string.gmatch(all[i + 1], '[^|]+') do f[#f + 1] = part end
  local exp = tonumber(f[3])
  if tonumber(f[2]) ~= start or (exp ~= 0 and exp <= now) then
    redis.call('HDEL', KEYS[1], all[i])
  else
    granted = granted + tonumber(f[1])
  end
end
redis.call('HSET', KEYS[1], ARGV[1],
  string.format('%.0f|%.0f|%.0f', tonumber(ARGV[2]), start, expires))
redis.call('PEXPIRE', KEYS[1], finish - now + HOUR)
granted = granted + tonumber(ARGV[2])

local q = redis.call('HMGET', KEYS[2], 'p', 'u')
local used = 0
if q[1] and tonumber(q[1]) == start then used = tonumber(q[2] or '0') end
local capacity = tonumber(ARGV[6]) + granted
return {capacity, capacity - used, now}
