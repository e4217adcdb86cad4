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
local HOUR, DAY = 3600000, 86400000
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[5])
local expires = tonumber(ARGV[3])
if expires ~= 0 and expires <= now then
  return {-1, now}
end

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
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

local code = tonumber(ARGV[4])
local start, finish
if code == 1 then
  start = now - now % HOUR; finish = start + HOUR
elseif code == 2 then
  start = now - now % DAY; finish = start + DAY
else
  local y, m = civil_from_days(math.floor(now / DAY))
  start = days_from_civil(y, m, 1) * DAY
  if m == 12 then y, m = y + 1, 1 else m = m + 1 end
  finish = days_from_civil(y, m, 1) * DAY
end

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
