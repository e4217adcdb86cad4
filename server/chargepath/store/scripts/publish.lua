-- publish.lua: make a policy document the live one, with the next version number.
--
-- KEYS[1]  the policy hash: "v" version, "sha" digest of the document, "doc" canonical JSON
-- ARGV[1]  canonical JSON of the new document
-- ARGV[2]  its digest
-- ARGV[3]  "1" to publish even when the digest is unchanged (a forced new version)
-- Reply:   {version, changed (0/1)}
-- Invariant: versions only grow; an unchanged document keeps its version, so restarting
-- gateways on the same plan file does not churn versions.
local cur = redis.call('HMGET', KEYS[1], 'v', 'sha')
local v = tonumber(cur[1] or '0')
if cur[2] == ARGV[2] and ARGV[3] ~= '1' then
  return {v, 0}
end
v = v + 1
redis.call('HSET', KEYS[1], 'v', v, 'sha', ARGV[2], 'doc', ARGV[1])
return {v, 1}
