-- quota.lua: a period quota's usage and grants (`-- #include lib/quota.lua`).
-- The Python reference is chargepath/core/counters.py with core/periods.py;
-- tests/integration/test_counter_parity.py holds both to the same answers.
--
-- A quota hash holds the start "p" of the period it counts and the units "u" used in it.
-- Grants live in their own hash: grant id -> "amount|period_start_ms|expires_ms" (0: no
-- expiry); a grant counts only in the period it was made in, and only until it expires.

-- #include lib/numbers.lua
-- #include lib/periods.lua

-- The units used in the period that starts at `start`, of a counter that holds `stored_used`
-- for the period that started at `stored_start` (nil: never written): a counter of an
-- earlier period counts nothing, so a quota resets at its period's boundary.
local function quota_used(stored_start, stored_used, start)
  if stored_start == start then return stored_used end
  return 0
end

-- The sum of the live grants of the grants hash `key` for the period starting at `start`;
-- with a table `live`, each live grant's id, amount and expiry are appended to it.
local function quota_grants(key, start, now, live)
  local all = redis.call('HGETALL', key)
  local sum = 0
  for i = 1, #all, 2 do
    local g = split_bars(all[i + 1])
    local exp = tonumber(g[3])
    if tonumber(g[2]) == start and (exp == 0 or exp > now) then
      sum = sum + tonumber(g[1])
      if live then
        live[#live + 1] = all[i]
        live[#live + 1] = tonumber(g[1])
        live[#live + 1] = exp
      end
    end
  end
  return sum
end

-- The quota hash `key` now: its period's start and end, the units used in it.
local function quota_read(key, period, now)
  local start, finish = period_bounds(now, period)
  local v = redis.call('HMGET', key, 'p', 'u')
  return start, finish, quota_used(tonumber(v[1]), tonumber(v[2] or '0'), start)
end

-- Write a quota back; it expires an hour after its period ends. Returns its time to live
-- in ms.
local function quota_write(key, start, finish, used, now)
  local ttl = finish - now + HOUR_MS
  redis.call('HSET', key, 'p', int(start), 'u', int(used))
  redis.call('PEXPIRE', key, ttl)
  return ttl
end
