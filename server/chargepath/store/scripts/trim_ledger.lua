-- trim_ledger.lua: trim a tenant's ledger up to what every reader has safely taken, atomically.
--
-- KEYS[1]  tenant ledger stream, cp:{T}:ledger
-- KEYS[2]  tenant export mark, cp:{T}:ledger:exported (string: the id of the last entry exported)
--
-- ARGV[1]  new export mark: id of the last entry an export wrote out ("" = do not move the mark)
-- ARGV[2]  id the export started from ("-" = the start of the ledger)
--
-- Reply: {entries trimmed, safe point ("" = nothing may be trimmed), mark moved (0/1)}
--
-- The export mark only moves forward, and only if the export was contiguous with it: no entry
-- lies between the old mark and the export's first id (an export with --since past unexported
-- entries does not let them be trimmed).
--
-- Safe point (XTRIM MINID keeps every entry >= it):
--  * with consumer groups: the minimum over every group of
--      - its smallest pending (delivered, unacknowledged) id, if it has pending entries: that
--        entry and everything after it is kept;
--      - else the id just after its last-delivered-id: everything delivered was acknowledged.
--  * with no consumer group: the id just after the export mark (nothing without a mark).
--
-- Invariant: an entry that some group has not acknowledged, or (without groups) that no export
-- has written out, is never trimmed. Reading the groups and trimming happen in this one script,
-- so no XREADGROUP, XACK or XADD can come in between.

redis.replicate_commands()

-- Stream ids are "<ms>-<seq>", two unsigned 64-bit decimals: compared and incremented as
-- strings so that no value is rounded by Lua's doubles.
local function cmp_dec(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end

local function split_id(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return ms, seq
end

local function less(a, b)
  local ams, aseq = split_id(a)
  local bms, bseq = split_id(b)
  local c = cmp_dec(ams, bms)
  if c ~= 0 then return c < 0 end
  return cmp_dec(aseq, bseq) < 0
end

local function incr_dec(s)
  local digits = {}
  for i = 1, #s do digits[i] = string.byte(s, i) - 48 end
  local i = #digits
  while i >= 1 do
    if digits[i] < 9 then
      digits[i] = digits[i] + 1
      break
    end
    digits[i] = 0
    i = i - 1
  end
  local out = table.concat(digits)
  if i == 0 then out = '1' .. out end
  return out
end

local UINT64_MAX = '18446744073709551615'

-- the smallest id greater than `id`
local function next_id(id)
  local ms, seq = split_id(id)
  if seq == UINT64_MAX then return incr_dec(ms) .. '-0' end
  return ms .. '-' .. incr_dec(seq)
end

local mark = redis.call('GET', KEYS[2])
local moved = 0
if ARGV[1] ~= '' and (not mark or less(mark, ARGV[1])) then
  local contiguous = true
  if ARGV[2] ~= '-' and (not mark or less(mark, ARGV[2])) then
    local gap = redis.call('XRANGE', KEYS[1], mark and ('(' .. mark) or '-', '(' .. ARGV[2],
      'COUNT', 1)
    contiguous = #gap == 0
  end
  if contiguous then
    redis.call('SET', KEYS[2], ARGV[1])
    mark = ARGV[1]
    moved = 1
  end
end

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, '', moved}
end

local safe = nil
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then
  if mark then safe = next_id(mark) end
else
  for _, g in ipairs(groups) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    local point
    if tonumber(info['pending']) > 0 then
      point = redis.call('XPENDING', KEYS[1], info['name'])[2]
    else
      point = next_id(info['last-delivered-id'])
    end
    if safe == nil or less(point, safe) then safe = point end
  end
end

if not safe then
  return {0, '', moved}
end
return {redis.call('XTRIM', KEYS[1], 'MINID', safe), safe, moved}
