-- lease.lua: quota leases' state and refunds, shared by lease.lua (asks), lease_sweep.lua
-- (expiry) (`-- #include lib/lease.lua`). The Python reference of the sizing rule is
-- chargepath/core/leases.py; tests/integration/test_lease_store.py holds both to the same
-- answers.
--
-- A lease is a hash (chargepath/store/protocol.py: lease_key) with the fields
--   sl, k, m      its subject's slice and key, its metric
--   h             its holder (for people), as named when it was opened
--   g, u, o       units granted in all, reported within the grant, reported beyond it
--   a             units available: granted less reported within, never below 0
--   x             when it expires (ms, Redis' clock + offset); c: when it was opened
--   v             the policy version of its last grant
--   lg, rp, vm    its last grant, renewal threshold (percent), validity (ms)
--   hd            its holds, MessagePack, HOLD_SLOTS values each: the counter's key, kind,
--                 a rate's capacity_sub, scale and refill_per_ms (a quota's period in the
--                 first), units held, and a quota's period start (ms)
-- and a member of the tenant's lease index (a sorted set scored by expiry), so the sweeper
-- finds the expired ones.
--
-- Invariant kept: for each hold, units held <= the lease's units available; every unit a
-- lease takes from a counter is given back to it exactly once (release or expiry), or spent
-- (reported), or forfeited with the quota period it came from. A rate's refund never lifts
-- a bucket above its capacity; a quota's refund lands only in the period it came from.

-- #include lib/numbers.lua
-- #include lib/bucket.lua
-- #include lib/quota.lua

-- Counter states by key name, loaded once per script run and written back by
-- counters_close(): every change to a counter in one run goes through its state.
local counters = {}

-- The state of the rate counter `key` (a spec with capacity_sub, scale, refill_per_ms).
local function rate_state(key, spec, now)
  local st = counters[key]
  if not st then
    st = {key = key, kind = KIND_RATE, spec = spec, level = bucket_read(key, spec, now),
      dirty = false}
    counters[key] = st
  end
  return st
end

-- The state of the quota counter `key` of `period` (its grants in `grants_key`, or nil).
local function quota_state(key, period, grants_key, now)
  local st = counters[key]
  if not st then
    local start, finish, used = quota_read(key, period, now)
    st = {key = key, kind = KIND_QUOTA, start = start, finish = finish, used = used,
      granted = 0, dirty = false}
    if grants_key then st.granted = quota_grants(grants_key, start, now) end
    counters[key] = st
  end
  return st
end

local function counters_close(now)
  local now_s = int(now)
  for key, st in pairs(counters) do
    if st.dirty then
      if st.kind == KIND_RATE then
        bucket_write(key, st.level, st.spec, now_s)
      else
        quota_write(key, st.start, st.finish, st.used, now)
      end
    end
  end
end

-- The holds of a lease hash's "hd" field as a list of tables.
local function holds_read(packed)
  local out = {}
  if not packed or packed == '' then return out end
  local v = cmsgpack.unpack(packed)
  for o = 0, #v - 1, HOLD_SLOTS do
    out[#out + 1] = {key = v[o + HOLD_KEY], kind = v[o + HOLD_KIND],
      capacity_sub = v[o + HOLD_CAPACITY_SUB], scale = v[o + HOLD_SCALE],
      refill_per_ms = v[o + HOLD_REFILL_PER_MS], period = v[o + HOLD_CAPACITY_SUB],
      units = v[o + HOLD_UNITS], start = v[o + HOLD_START]}
  end
  return out
end

local function holds_pack(holds)
  local v = {}
  for _, h in ipairs(holds) do
    local o = #v
    v[o + HOLD_KEY], v[o + HOLD_KIND] = h.key, h.kind
    if h.kind == KIND_RATE then
      v[o + HOLD_CAPACITY_SUB], v[o + HOLD_SCALE] = h.capacity_sub, h.scale
      v[o + HOLD_REFILL_PER_MS] = h.refill_per_ms
    else
      v[o + HOLD_CAPACITY_SUB], v[o + HOLD_SCALE], v[o + HOLD_REFILL_PER_MS] = h.period, 1, 0
    end
    v[o + HOLD_UNITS], v[o + HOLD_START] = h.units, h.start
  end
  return cmsgpack.pack(v)
end

-- Give back every unit the holds still hold: a bucket's level up (never above its
-- capacity), a quota's counter down if still in the period the units came from. Returns
-- the units given back (the largest hold: each limit held the same units).
local function holds_refund(holds, now)
  local back = 0
  for _, h in ipairs(holds) do
    if h.units > 0 then
      if h.kind == KIND_RATE then
        local st = rate_state(h.key, h, now)
        st.level = math.min(st.spec.capacity_sub, st.level + h.units * st.spec.scale)
        st.dirty = true
        back = math.max(back, h.units)
      else
        local st = quota_state(h.key, h.period, nil, now)
        if st.start == h.start then
          st.used = math.max(0, st.used - h.units)
          st.dirty = true
          back = math.max(back, h.units)
        end
      end
    end
  end
  return back
end

-- End the lease `id` (hash `key`, already read into `lease`): refund, delete, unindex.
-- Returns the units given back.
local function lease_close(index_key, key, id, lease, now)
  local back = holds_refund(holds_read(lease.hd), now)
  redis.call('DEL', key)
  redis.call('ZREM', index_key, id)
  return back
end

-- The lease hash `key` as a table of its fields, or nil.
local function lease_read(key)
  local all = redis.call('HGETALL', key)
  if #all == 0 then return nil end
  local lease = {}
  for i = 1, #all, 2 do lease[all[i]] = all[i + 1] end
  for _, f in ipairs({'g', 'u', 'o', 'a', 'x', 'c', 'lg', 'rp', 'vm', 'v'}) do
    lease[f] = tonumber(lease[f] or '0')
  end
  return lease
end
