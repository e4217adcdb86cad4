-- flush_aggregates.lua: move the ledger aggregates of every ended interval into the ledger.
--
-- Plans with `ledger: {mode: aggregate}` do not write one ledger entry per allowed admit:
-- decide.lua adds the admit to a per-interval aggregate instead (HINCRBY, in the same atomic step
-- as the debit). This script turns every aggregate whose interval has ended into one ledger
-- entry.
--
-- KEYS[1]  tenant ledger aggregates hash, cp:{T}:agg, with two fields per aggregate:
--            "<interval start ms>|<interval ms>|<slice>|<key>|<metric>|<mode>|a"  sum of amounts
--            "<interval start ms>|<interval ms>|<slice>|<key>|<metric>|<mode>|n"  count
--          (slice and key may be empty; none of the parts can contain '|')
-- KEYS[2]  tenant ledger stream, cp:{T}:ledger
--
-- ARGV[1]  clock offset, ms, added to Redis TIME exactly as decide.lua does (0 outside tests)
--
-- Reply: the number of ledger entries written.
--
-- Each entry written has the fields rid "agg:<start>:<slice>:<key>:<metric>", did "", m, a (sum),
-- n (count), mo, d (ALLOW), r (OK), ts (now), is (interval start), ie (interval end),
-- sl and k when not empty, and ag "1".
--
-- Invariant: totals are conserved, nothing counted is lost or doubled. For every aggregate
-- whose interval has ended (start + interval <= now) the XADD of its sum and count and the HDEL
-- of both of its fields happen in this one script, so there is no moment at which the units
-- are in both places or in neither, whoever calls it, however often, and concurrently with
-- decisions. The sum and count are copied as the strings Redis holds (no Lua number rounding).
-- A decision that adds to an interval already flushed (possible only if two callers use
-- different clock offsets) creates a fresh aggregate, which a later flush writes as a second
-- entry with the same rid: the total is split over two entries, never lost or counted twice.

redis.replicate_commands()

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])

local function fmt(x)
  return string.format('%.0f', x)
end

-- split on '|', keeping empty parts ("a||b" -> {"a", "", "b"})
local function split(s)
  local out, pos = {}, 1
  while true do
    local i = string.find(s, '|', pos, true)
    if not i then
      out[#out + 1] = string.sub(s, pos)
      return out
    end
    out[#out + 1] = string.sub(s, pos, i - 1)
    pos = i + 1
  end
end

local all = redis.call('HGETALL', KEYS[1])
local sums, counts, bases = {}, {}, {}
for i = 1, #all, 2 do
  local base, kind = string.match(all[i], '^(.*)|([an])$')
  if base then
    if sums[base] == nil and counts[base] == nil then
      bases[#bases + 1] = base
    end
    if kind == 'a' then sums[base] = all[i + 1] else counts[base] = all[i + 1] end
  end
end
-- deterministic order (interval start first: it is the leading, fixed-width number)
table.sort(bases)

local written = 0
for _, base in ipairs(bases) do
  local p = split(base)
  local start, len = tonumber(p[1]), tonumber(p[2])
  -- a field that does not parse is left alone rather than guessed at
  if #p == 6 and start and len and start + len <= now then
    local slice, key, metric, mode = p[3], p[4], p[5], p[6]
    local entry = {'rid', table.concat({'agg', p[1], slice, key, metric}, ':'), 'did', '',
      'm', metric, 'a', sums[base] or '0', 'n', counts[base] or '0', 'mo', mode,
      'd', fmt(ALLOW), 'r', fmt(OK), 'ts', fmt(now), 'is', p[1], 'ie', fmt(start + len)}
    if slice ~= '' then entry[#entry + 1] = 'sl'; entry[#entry + 1] = slice end
    if key ~= '' then entry[#entry + 1] = 'k'; entry[#entry + 1] = key end
    entry[#entry + 1] = 'ag'
    entry[#entry + 1] = '1'
    redis.call('XADD', KEYS[2], '*', unpack(entry))
    redis.call('HDEL', KEYS[1], base .. '|a', base .. '|n')
    written = written + 1
  end
end

return written
