-- auth_create.lua: store a new API key (its hash only) and announce the change.
--
-- KEYS[1]  the key's record hash, cp:{auth}:key:<key_id>
-- KEYS[2]  the index set of key ids, cp:{auth}:keys
-- KEYS[3]  the auth epoch counter, cp:{auth}:epoch
-- ARGV[1]  key id
-- ARGV[2]  SHA-256 of the secret, hex
-- ARGV[3]  tenant ("" for an operator key)
-- ARGV[4]  role: meter, viewer or operator
-- ARGV[5]  expiry, ms since the epoch ("" = never)
-- ARGV[6]  description
-- ARGV[7]  the pub/sub channel of key changes
-- Reply:   the creation time (ms, Redis' clock), or 0 if the key id is taken (nothing written)
-- Invariant: a key id is never reused, and every change bumps the epoch and is published, so
-- a gateway that misses the message still sees the epoch move.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'hash', ARGV[2], 'tenant', ARGV[3], 'role', ARGV[4],
  'created_ms', now, 'expires_ms', ARGV[5], 'revoked_ms', '', 'description', ARGV[6])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[7], ARGV[1])
return now
