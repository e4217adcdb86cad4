-- auth_revoke.lua: revoke an API key now and announce the change.
--
-- KEYS[1]  the key's record hash, cp:{auth}:key:<key_id>
-- KEYS[2]  the auth epoch counter, cp:{auth}:epoch
-- ARGV[1]  key id
-- ARGV[2]  the pub/sub channel of key changes
-- Reply:   the revocation time (ms, Redis' clock) after the call, or 0 for an unknown key
-- Invariant: a revocation only ever moves earlier (a pending grace period is cut short, a past
-- revocation is kept), and every change bumps the epoch and is published.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local revoked = tonumber(redis.call('HGET', KEYS[1], 'revoked_ms') or '')
if revoked ~= nil and revoked <= now then
  return revoked
end
redis.call('HSET', KEYS[1], 'revoked_ms', now)
redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[2], ARGV[1])
return now
