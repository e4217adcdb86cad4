-- stamp.lua: record that a tenant's decisions must use policy version ARGV[1] or newer.
--
-- KEYS[1]  the tenant's entitlement hash ("v" = stamped version)
-- ARGV[1]  the version just published
-- ARGV[2]  the tenant's name: a stamp that moves is announced on ROOM_CHANNEL (store/room.py),
--          since a new version may add room (a resume, a larger capacity): every gateway's
--          over-limit cache drops the tenant's entries
-- Reply:   the stamped version after the call
-- Invariant: the stamp never goes backwards, so two publishers racing cannot re-admit an
-- older version. decide.lua refuses (STALE) a gateway whose version is below the stamp. The
-- announcement follows the stamp: a decision made after it uses the new version.
local cur = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
local v = tonumber(ARGV[1])
if v > cur then
  redis.call('HSET', KEYS[1], 'v', v)
  if ARGV[2] then redis.call('PUBLISH', ROOM_CHANNEL, ARGV[2]) end
  return v
end
return cur
