-- publish.lua: make a policy document the live one, with the next version number.
--
-- KEYS[1]  the policy hash: "v" version, "sha" digest of the document, "doc" canonical JSON
-- ARGV[1]  canonical JSON of the new document
-- ARGV[2]  its digest
-- ARGV[3]  "1" to publish even when the digest is unchanged (a forced new version)
-- ARGV[4]  the version the change was computed from ("" for any): a compare-and-set, so two
--          admin changes made at once cannot overwrite each other
-- Reply:   {version, changed (0/1)}, or {REPLY_REFUSED, live version} when ARGV[4] is not
--          the live one
-- Invariant: versions only grow; an unchanged document keeps its version, so restarting
-- gateways on the same plan file does not churn versions.
local cur = redis.call('HMGET', KEYS[1], 'v', 'sha')
local v = tonumber(cur[1] or '0')
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= v then
  return {REPLY_REFUSED, v}
end
if cur[2] == ARGV[2] and ARGV[3] ~= '1' then
  return {v, 0}
end
v = v + 1
redis.call('HSET', KEYS[1], 'v', v, 'sha', ARGV[2], 'doc', ARGV[1])
return {v, 1}
