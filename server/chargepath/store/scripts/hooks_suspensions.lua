-- hooks_suspensions.lua: turn changes of the live policy's suspensions into webhook events,
-- each exactly once, whichever gateway processes run it with whichever policy version.
--
-- KEYS[1]  the suspension outbox (stream cp:{cp:policy}:hooks; consumer group ARGV[3])
-- KEYS[2]  the suspensions last announced (hash: "tenant US slice US key" -> reason)
-- KEYS[3]  the policy version they are of (string)
-- ARGV[1]  the caller's policy version
-- ARGV[2]  the outbox's length cap (XADD MAXLEN ~)
-- ARGV[3]  the consumer group of the deliverers
-- ARGV[4..] the suspensions of the caller's policy: subject, reason, subject, reason...
-- Reply: {events written, the version the record is of}
--
-- Invariant: the record only moves forward in policy versions: a caller with a version not
-- newer than the record's changes nothing, so two processes at the same version write one
-- set of events. The first call records the suspensions without events. An outbox entry:
-- "t" tenant, "sl" slice, "k" key, "s" "1" suspended / "0" resumed, "r" reason, "v" the
-- version, "ts" the Redis time in ms.

local version = tonumber(ARGV[1])
local recorded = tonumber(redis.call('GET', KEYS[3]) or '-1')
if version <= recorded then return {0, recorded} end

local now = {}
for i = 4, #ARGV - 1, 2 do now[ARGV[i]] = ARGV[i + 1] end
local written = 0
if recorded >= 0 then
  if redis.call('EXISTS', KEYS[1]) == 0 then
    pcall(redis.call, 'XGROUP', 'CREATE', KEYS[1], ARGV[3], '0', 'MKSTREAM')
  end
  local t = redis.call('TIME')
  local ts = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  local function event(subject, suspended, reason)
    local tenant, slice, key = string.match(subject, '^([^\31]*)\31([^\31]*)\31([^\31]*)$')
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 't', tenant, 'sl', slice, 'k', key,
      's', suspended, 'r', reason, 'v', ARGV[1], 'ts', ts)
    written = written + 1
  end
  local before = redis.call('HGETALL', KEYS[2])
  local was = {}
  for i = 1, #before, 2 do was[before[i]] = before[i + 1] end
  for i = 4, #ARGV - 1, 2 do
    if was[ARGV[i]] == nil then event(ARGV[i], '1', ARGV[i + 1]) end
  end
  local gone = {}
  for subject, _ in pairs(was) do
    if now[subject] == nil then gone[#gone + 1] = subject end
  end
  table.sort(gone)
  for _, subject in ipairs(gone) do event(subject, '0', was[subject]) end
end
redis.call('DEL', KEYS[2])
for i = 4, #ARGV - 1, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('SET', KEYS[3], ARGV[1])
return {written, version}
