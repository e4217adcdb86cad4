-- publish.lua: make a policy document the live one, with the next version number.
--
-- KEYS[1]  the policy hash: "v" version, "sha" digest of the document, "doc" canonical JSON;
--          and the plan file last applied at a gateway's start: "file_doc" its canonical
--          JSON, "file_sha" its digest, "file_v" the live version once it was applied
-- KEYS[2]  optional: the audit stream (same slot as KEYS[1]: its hash tag is KEYS[1]'s name)
-- ARGV[1]  canonical JSON of the new document
-- ARGV[2]  its digest
-- ARGV[3]  "1" to publish even when the digest is unchanged (a forced new version)
-- ARGV[4]  the version the change was computed from ("" for any): a compare-and-set, so two
--          admin changes made at once cannot overwrite each other
-- ARGV[5]  canonical JSON of the plan file the document was computed from at a start; ""
--          for a change made through the admin API (the file record is left as it is)
-- ARGV[6]  that plan file's digest ("" with ARGV[5])
-- ARGV[7]  with KEYS[2]: the audit stream's length cap (XADD MAXLEN ~)
-- ARGV[8..] with KEYS[2]: the audit entry's fields, name and value pairs, without "vb"/"va"
-- Reply:   {version, changed (0/1)}, or {REPLY_REFUSED, live version} when ARGV[4] is not
--          the live one
-- Invariant: versions only grow; an unchanged document keeps its version, so restarting
-- gateways on the same plan file does not churn versions. The document and the record of the
-- file it came from are written together, so the next start compares against exactly them.
-- With KEYS[2], a published (or unchanged) document and its audit entry are written together
-- or not at all; a conflict writes neither (the caller retries, and audits the retry).
local cur = redis.call('HMGET', KEYS[1], 'v', 'sha')
local v = tonumber(cur[1] or '0')
local before = v
if ARGV[4] ~= '' and tonumber(ARGV[4]) ~= v then
  return {REPLY_REFUSED, v}
end
local changed = 0
if cur[2] ~= ARGV[2] or ARGV[3] == '1' then
  v = v + 1
  changed = 1
  redis.call('HSET', KEYS[1], 'v', v, 'sha', ARGV[2], 'doc', ARGV[1])
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'file_doc', ARGV[5], 'file_sha', ARGV[6], 'file_v', v)
end
if KEYS[2] then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*',
    'vb', tostring(before), 'va', tostring(v), unpack(ARGV, 8))
end
return {v, changed}
