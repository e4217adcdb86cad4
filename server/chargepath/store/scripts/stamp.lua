-- stamp.lua: record that a tenant's decisions must use policy version ARGV[1] or newer.
--
-- KEYS[1]  the tenant's entitlement hash ("v" = stamped version)
-- ARGV[1]  the version just published
-- Reply:   the stamped version after the call
-- Invariant: the stamp never goes backwards, so two publishers racing cannot re-admit an
-- older version. decide.lua refuses (STALE) a gateway whose version is below the stamp.
local cur = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
local v = tonumber(ARGV[1])
if v > cur then
  redis.call('HSET', KEYS[1], 'v', v)
  return v
end
return cur
