-- hooks_thresholds.lua: copy a tenant's quota threshold events from its recent-decisions
-- trail into its webhook outbox, each exactly once, whichever gateway processes run it.
--
-- KEYS[1]  the tenant's recent-decisions trail (stream cp:{T}:recent, written by decide.lua)
-- KEYS[2]  the tenant's webhook outbox (stream cp:{T}:hooks; consumer group ARGV[3])
-- KEYS[3]  the relay's cursor: id of the last trail entry looked at (string)
-- ARGV[1]  at most this many trail entries looked at per call
-- ARGV[2]  the outbox's length cap (XADD MAXLEN ~)
-- ARGV[3]  the consumer group of the deliverers
-- Reply: {events copied, gap, cursor}: gap is 1 when the trail's oldest entry is newer than
--   the cursor, i.e. entries after the cursor may have been trimmed before they were seen.
--
-- Invariant: the cursor moves past a trail entry in the same atomic step that copies it, so
-- an "e" = "th" entry is copied once. The first call starts at the trail's end: events from
-- before webhooks were configured are not sent. An outbox entry holds the trail entry's
-- fields and "src", the trail entry's id, from which the event id is derived.

if redis.call('EXISTS', KEYS[2]) == 0 then
  -- the outbox and its group; pcall: a group left from an outbox emptied by XDEL is kept
  pcall(redis.call, 'XGROUP', 'CREATE', KEYS[2], ARGV[3], '0', 'MKSTREAM')
end
local cursor = redis.call('GET', KEYS[3])
if not cursor then
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  cursor = last[1] and last[1][1] or '0-0'
  redis.call('SET', KEYS[3], cursor)
  return {0, 0, cursor}
end

local function older(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  if ams ~= bms then return ams < bms end
  return tonumber(aseq) < tonumber(bseq)
end

local gap = 0
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if first[1] and cursor ~= '0-0' and older(cursor, first[1][1]) then gap = 1 end

local entries = redis.call('XRANGE', KEYS[1], '(' .. cursor, '+', 'COUNT', tonumber(ARGV[1]))
local copied = 0
for _, entry in ipairs(entries) do
  local f = entry[2]
  if f[1] == 'e' and f[2] == 'th' then
    local args = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'src', entry[1]}
    for i = 3, #f do args[#args + 1] = f[i] end
    redis.call(unpack(args))
    copied = copied + 1
  end
  cursor = entry[1]
end
if #entries > 0 then redis.call('SET', KEYS[3], cursor) end
return {copied, gap, cursor}
