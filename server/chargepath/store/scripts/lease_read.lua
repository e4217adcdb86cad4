-- lease_read.lua: the open leases of one subject, in one consistent read on Redis' clock.
-- Invariant kept: it reads only; nothing is written.
--
-- KEYS[1]  the tenant's lease index (sorted set: lease id scored by expiry, ms)
-- ARGV[1]  clock offset, ms
-- ARGV[2]  the subject's slice ("" none), ARGV[3] its key ("" none), ARGV[4] a metric
--          ("" any)
-- ARGV[5]  the most leases to return
-- ARGV[6]  the prefix of the tenant's lease hashes (in the index's slot: see
--          lease_sweep.lua)
--
-- Reply: {now_ms, then per lease: id, metric, holder, granted, used (within), available,
-- expires_at_ms, policy version, overage, the number of holds, then per hold: its counter's
-- key, units held, a quota's period start}, soonest expiry first; a lease past its expiry
-- that the sweeper has not closed yet is left out.

-- #include lib/lease.lua

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local limit = tonumber(ARGV[5])
local out = {now}
local n = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')) do
  local v = redis.call('HMGET', ARGV[6] .. id, 'sl', 'k', 'm', 'h', 'g', 'u', 'a', 'x', 'v',
    'o', 'hd')
  if v[1] == ARGV[2] and v[2] == ARGV[3] and (ARGV[4] == '' or v[3] == ARGV[4]) then
    local holds = holds_read(v[11])
    for _, x in ipairs({id, v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], #holds}) do
      out[#out + 1] = x
    end
    for _, h in ipairs(holds) do
      out[#out + 1] = h.key
      out[#out + 1] = h.units
      out[#out + 1] = h.start
    end
    n = n + 1
    if n >= limit then break end
  end
end
return out
