-- lease_sweep.lua: close the expired leases of ONE tenant, on Redis' clock: every unit they
-- still hold goes back to its counter (lib/lease.lua: a bucket up to its capacity, a quota
-- only within the period the units came from), their hashes are deleted and unindexed.
-- Invariant kept: each lease is closed once, however many gateway processes sweep at once
-- (a script runs alone), and gives back exactly the units it still holds.
--
-- KEYS[1]  the tenant's lease index (sorted set: lease id scored by expiry, ms)
-- ARGV[1]  clock offset, ms
-- ARGV[2]  the most leases to close in this run
-- ARGV[3]  the prefix of the tenant's lease hashes (chargepath/store/protocol.py:
--          lease_key): the hashes and the counters they name share the tenant's hash tag,
--          so they live in the index's slot (on a cluster too), though not in KEYS
--
-- ARGV[4]  the tenant's name: a run that gave units back publishes it on ROOM_CHANNEL
--          (store/room.py: the over-limit caches drop the tenant's entries)
-- Reply: {now_ms, leases closed, units given back}.

redis.replicate_commands()

-- #include lib/lease.lua

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local back = 0
for _, id in ipairs(due) do
  local key = ARGV[3] .. id
  local lease = lease_read(key)
  if lease then
    back = back + lease_close(KEYS[1], key, id, lease, now)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
counters_close(now)
if back > 0 and ARGV[4] then redis.call('PUBLISH', ROOM_CHANNEL, ARGV[4]) end
return {now, #due, back}
