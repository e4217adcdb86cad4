-- grant.lua: top up a quota counter for its current period.
--
-- KEYS[1]  the counter's grants hash: grant id -> "amount|period_start_ms|expires_ms"
-- KEYS[2]  the quota counter hash (p period start, u used), read only
-- ARGV[1]  grant id      ARGV[2] amount (units)     ARGV[3] expires at, ms (0: end of period)
-- ARGV[4]  period code (PERIOD_*)                     ARGV[5] clock offset, ms
-- ARGV[6]  the quota's amount per period (units)
-- ARGV[7]  the tenant's name: the grant is announced on ROOM_CHANNEL (store/room.py), so that
--          every gateway's over-limit cache drops the tenant's entries (a grant adds room)
-- Reply:   {capacity, remaining, now_ms}, or {REPLY_REFUSED, now_ms} if the expiry is
-- already past
-- Invariant: a grant counts only in the period it was made in, and only until it expires
-- (lib/quota.lua); grants of past periods and expired grants are removed here, so the hash
-- stays small.

-- #include lib/numbers.lua
-- #include lib/quota.lua

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000) + tonumber(ARGV[5])
local expires = tonumber(ARGV[3])
if expires ~= 0 and expires <= now then
  return {REPLY_REFUSED, now}
end

local start, finish, used = quota_read(KEYS[2], tonumber(ARGV[4]), now)

local granted = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local f = split_bars(all[i + 1])
  local exp = tonumber(f[3])
  if tonumber(f[2]) ~= start or (exp ~= 0 and exp <= now) then
    redis.call('HDEL', KEYS[1], all[i])
  else
    granted = granted + tonumber(f[1])
  end
end
redis.call('HSET', KEYS[1], ARGV[1],
  string.format('%.0f|%.0f|%.0f', tonumber(ARGV[2]), start, expires))
redis.call('PEXPIRE', KEYS[1], finish - now + HOUR_MS)
granted = granted + tonumber(ARGV[2])
if ARGV[7] then redis.call('PUBLISH', ROOM_CHANNEL, ARGV[7]) end

local capacity = tonumber(ARGV[6]) + granted
return {capacity, capacity - used, now}
