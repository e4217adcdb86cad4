-- auth_rotate.lua: replace an API key by a new one (a new key id) and revoke the old one, now
-- or after a grace period, in one step; announce both.
--
-- KEYS[1]  the old key's record hash, cp:{auth}:key:<old_id>
-- KEYS[2]  the new key's record hash, cp:{auth}:key:<new_id>
-- KEYS[3]  the index set of key ids, cp:{auth}:keys
-- KEYS[4]  the auth epoch counter, cp:{auth}:epoch
-- ARGV[1]  old key id
-- ARGV[2]  new key id
-- ARGV[3]  SHA-256 of the new secret, hex
-- ARGV[4]  grace period, ms (0: revoke now)
-- ARGV[5]  the pub/sub channel of key changes
-- Reply:   {status, created_ms, old_revoked_ms}; status 1 done, 0 unknown old key,
--          -1 old key revoked (or already rotated), -2 old key expired, -3 new id taken.
--          Nothing is written unless status is 1.
-- Invariant: the new key copies the old one's tenant, role, expiry and description, so a
-- rotation never widens what a key may do.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0, 0}
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {-3, 0, 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old = redis.call('HMGET', KEYS[1], 'tenant', 'role', 'expires_ms', 'revoked_ms',
  'description')
if old[4] ~= false and old[4] ~= '' then
  return {-1, 0, 0}
end
local expires = tonumber(old[3] or '')
if expires ~= nil and expires <= now then
  return {-2, 0, 0}
end
local revoked = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[2], 'hash', ARGV[3], 'tenant', old[1], 'role', old[2],
  'created_ms', now, 'expires_ms', old[3] or '', 'revoked_ms', '', 'description', old[5] or '')
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('HSET', KEYS[1], 'revoked_ms', revoked)
redis.call('INCR', KEYS[4])
redis.call('PUBLISH', ARGV[5], ARGV[1])
redis.call('PUBLISH', ARGV[5], ARGV[2])
return {1, now, revoked}
