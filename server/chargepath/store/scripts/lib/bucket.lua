-- bucket.lua: a token bucket's level over time, in sub-units (`-- #include lib/bucket.lua`).
-- The Python reference is chargepath/core/counters.py; tests/integration/test_counter_parity.py
-- holds both to the same answers.
--
-- A bucket hash holds its level "l" in sub-units of scale "s" at time "t"; no hash: full.
-- A spec (see decide.lua) gives capacity_sub, scale and refill_per_ms, all computed by the
-- gateway.

-- #include lib/numbers.lua

-- A level kept in sub-units of `old_scale`, in sub-units of `scale` (a plan change of the
-- refill rate changes the scale): rounded down.
local function bucket_convert(level, old_scale, scale)
  if old_scale == scale then return level end
  return floor(level / old_scale * scale)
end

-- The level at `now` of a bucket that held `level` at `at`: refilled since (a clock that went
-- back refills nothing), never above `capacity_sub` (which clamps to a smaller capacity).
local function bucket_refill(level, at, now, capacity_sub, refill_per_ms)
  local elapsed = now - at
  if elapsed < 0 then elapsed = 0 end
  return math.min(capacity_sub, level + elapsed * refill_per_ms)
end

-- Milliseconds until a bucket at `level` holds `need` sub-units (0: it does).
local function bucket_wait(need, level, refill_per_ms)
  if level >= need then return 0 end
  return floor((need - level + refill_per_ms - 1) / refill_per_ms)
end

-- `level` less `need` sub-units; a report may take it into debt, at most MAX_DEBT.
local function bucket_debit(level, need)
  return math.max(level - need, -MAX_DEBT)
end

-- The level now of the bucket hash `key`, for `spec`.
local function bucket_read(key, spec, now)
  local v = redis.call('HMGET', key, 'l', 't', 's')
  if not v[1] then return spec.capacity_sub end
  local level = bucket_convert(tonumber(v[1]), tonumber(v[3] or spec.scale), spec.scale)
  return bucket_refill(level, tonumber(v[2]), now, spec.capacity_sub, spec.refill_per_ms)
end

-- Write a bucket back: a full one is deleted (idle subjects cost nothing), any other expires
-- when it would be full again. Returns its time to live in ms (nil: deleted).
local function bucket_write(key, level, spec, now_s)
  if level >= spec.capacity_sub then
    redis.call('DEL', key)
    return nil
  end
  local ttl = bucket_wait(spec.capacity_sub, level, spec.refill_per_ms)
  redis.call('HSET', key, 'l', int(level), 't', now_s, 's', int(spec.scale))
  redis.call('PEXPIRE', key, ttl)
  return ttl
end
