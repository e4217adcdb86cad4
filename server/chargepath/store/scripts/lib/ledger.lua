-- ledger.lua: recorded usages reach the tenant's ledger (`-- #include lib/ledger.lua`); read
-- back by chargepath/store/ledger.py.
--
-- Ledger entry (one per recorded usage, one field "x"):
--   text US decision US reason US policy_version US decided_at_ms [US occurred_at_ms US labels]
-- (text: the usage's, see chargepath/store/protocol.py). A plan with per-interval aggregates
-- adds an allowed admit to two fields of the aggregates hash instead:
--   "<interval start ms>|<interval ms>|<slice>|<key>|<metric>|<mode>|a" (sum) and "...|n"
-- (count), which flush_aggregates.lua moves into the ledger once the interval has ended.

-- #include lib/numbers.lua

local aggregate_fields = {}  -- interval ms -> "<interval start>|<interval ms>"

-- `suffix`: US policy_version US decided_at_ms; `tail`: the usage's ledger tail
local function ledger_append(key, text, d, r, suffix, tail)
  redis.call('XADD', key, '*', 'x', text .. verdict_text(d, r) .. suffix .. tail)
end

-- `tail`: "|slice|key|metric|mode"
local function ledger_aggregate(key, interval_ms, now, amount, tail)
  local field = aggregate_fields[interval_ms]
  if not field then
    field = int(now - now % interval_ms) .. '|' .. int(interval_ms)
    aggregate_fields[interval_ms] = field
  end
  field = field .. tail
  redis.call('HINCRBY', key, field .. '|a', amount)
  redis.call('HINCRBY', key, field .. '|n', 1)
end
