-- gateway_report.lua: record the Check admits a gateway answered from a lease it holds
-- (chargepath/gateway_leases.py), each under its own request id, atomically, on Redis' clock.
--
-- Per admit, in order: if its request id already has a dedup record that says recorded (it
-- was decided and recorded elsewhere: another gateway, the store path, an earlier report),
-- it is not recorded again, and its units are credited back to the lease (they stay
-- available on the lease: the holder spent them on a usage that was already counted);
-- otherwise its ledger entry (an admit, ALLOW OK, as decide.lua writes one) and its dedup
-- record (ALLOW, recorded: a resend through any path is answered from it) are written, and
-- its units are spent from the lease: its available units and every hold go down by them
-- (they were taken from the limits when the lease was granted, so nothing is debited now).
--
-- Invariant kept: every admit the gateway answered from the lease is in the ledger exactly
-- once (here, or where its id was first recorded); a request id is never marked seen
-- without its ledger entry; a lease never spends more than it holds. If the lease is gone
-- (closed, expired: its holds were given back to the limits) or its holds cannot cover the
-- admits, nothing is written and the reply says so: the gateway then records the admits as
-- reports (decide.lua), which debit the limits, into debt if need be.
--
-- KEYS[1]  tenant ledger stream
-- KEYS[2]  the lease hash (lib/lease.lua)
-- KEYS[3..] the admits' request-id dedup records (decide.lua's), in the payload's order
-- ARGV[1]  clock offset, ms
-- ARGV[2]  dedup window, ms
-- ARGV[3]  the policy version the admits were answered with
-- ARGV[4]  MessagePack: per admit {fingerprint, decision id, amount, text, tail} (as
--          decide.lua's: text = request_id US decision_id US slice US key US metric US amount
--          US mode; tail = "" or US occurred_at_ms US labels JSON)
-- Reply: {GATEWAY_REPORTED, now_ms, units recorded, units credited back, lease available
-- after}, or {GATEWAY_LEASE_GONE, now_ms} (nothing written).

redis.replicate_commands()

-- #include lib/numbers.lua
-- #include lib/dedup.lua
-- #include lib/ledger.lua
-- #include lib/lease.lua

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local dedup_ms = tonumber(ARGV[2])
local admits = cmsgpack.unpack(ARGV[4])

local lease = lease_read(KEYS[2])
if not lease or lease.x <= now then
  return {GATEWAY_LEASE_GONE, now}
end

-- which admits are new, and the units they spend
local fresh, spend, credited = {}, 0, 0
for i, a in ipairs(admits) do
  local rec = redis.call('GET', KEYS[2 + i])
  local recorded = false
  if rec then
    local f = split_bars(rec)
    recorded = tonumber(f[5]) == VERDICT_RECORDED
  end
  if recorded then
    credited = credited + a[3]
  else
    fresh[#fresh + 1] = i
    spend = spend + a[3]
  end
end

local holds = holds_read(lease.hd)
if spend > lease.a then
  return {GATEWAY_LEASE_GONE, now}
end
for _, h in ipairs(holds) do
  if h.units < spend then return {GATEWAY_LEASE_GONE, now} end
end

local suffix = US .. ARGV[3] .. US .. int(now)
for _, i in ipairs(fresh) do
  local a = admits[i]
  ledger_append(KEYS[1], a[4], ALLOW, OK, suffix, a[5])
  dedup_remember(KEYS[2 + i], a[1], ALLOW, OK, '0', VERDICT_RECORDED, a[2], dedup_ms)
end
if spend > 0 then
  for _, h in ipairs(holds) do h.units = h.units - spend end
  redis.call('HSET', KEYS[2], 'a', int(lease.a - spend), 'u', int(lease.u + spend),
    'hd', holds_pack(holds))
end
return {GATEWAY_REPORTED, now, spend, credited, lease.a - spend}
