-- caps.lua: a tenant's caps on the records its usages keep in Redis, for decide.lua
-- (`-- #include lib/caps.lua`). The bounds are the policy's (core/plans.py, CapsSpec); the
-- payload's fifth array (chargepath/store/protocol.py) gives, per cap CAP_REQUEST_IDS ..
-- CAP_KEYS, the key index of its count (0: no cap) and its bound, then per spec its cap
-- (CAP_SLICES, CAP_KEYS or 0) and its member there.
--
-- A cap's count is a sorted set per tenant: member -> the ms at which the record it stands
-- for expires, on the records' own clock (Redis TIME without the test clock offset):
--   CAP_REQUEST_IDS  request id          its dedup record's expiry (now + dedup window)
--   CAP_SESSIONS     session id          its session's expiry, moved by every batch that
--                                        writes the session (now + session ttl)
--   CAP_SLICES       slice               the latest expiry of its slice-scoped counters
--   CAP_KEYS         slice US key        the latest expiry of its key-scoped counters
-- Invariant: a member is in its set exactly while its record lives. It is added by the script
-- that writes the record, scored with the record's expiry, and the members whose score is past
-- are removed (ZREMRANGEBYSCORE) before a usage is refused on the count; so the count of live
-- records is exact under expiry, without a timer, to within the run time of one script (a record's PX counts from
-- when its SET runs, its score from the script's TIME). A usage that would add a member to a
-- full set is refused (CAP_REACHED) before anything of it is written. The set itself expires
-- with its last member.
--
-- Cost per batch, for each cap in use: one ZCARD (when a usage adds a member) and, only once
-- the count reaches the bound, one ZREMRANGEBYSCORE; one ZADD for all the members the batch
-- adds or moves, one PTTL (and a PEXPIREAT when the set's expiry moves). Per usage: nothing for a resend or a known session; a ZSCORE
-- per distinct slice or key per batch. Memory: one sorted-set entry per live record (about
-- 120 bytes with a 32-character id, measured on Redis 6.2).

-- #include lib/numbers.lua

local caps_idx, caps_bound = {}, {}  -- cap -> key index of its set, bound (0: no cap)
local caps_n = {}                    -- cap -> members counted (see caps_full)
local caps_trimmed = {}              -- cap -> true once its expired members are removed
local caps_live = {}                 -- cap -> member -> live or not (read once a batch)
local caps_add = {}                  -- cap -> member -> score to write at the close
local caps_now = 0                   -- ms, Redis TIME without the clock offset
local caps_skip = 0                  -- characters of a dedup or session key before its id

-- `values`: the payload's caps array; `specs`: the batch's spec tables (they get `cap` and
-- `cap_member`); `real_now`: Redis TIME in ms, without the clock offset.
local function caps_open(values, specs, real_now)
  caps_now = real_now
  for c = 1, CAP_COUNT do
    caps_idx[c], caps_bound[c] = values[2 * c - 1], values[2 * c]
    caps_live[c], caps_add[c] = {}, {}
  end
  local o = 2 * CAP_COUNT
  if #values > o then
    for s = 1, #specs do
      local cap = values[o + 2 * s - 1]
      if cap > 0 and caps_bound[cap] > 0 then
        specs[s].cap, specs[s].cap_member = cap, values[o + 2 * s]
      end
    end
  end
  -- keys are tenant_prefix .. 'ent' and tenant_prefix .. 'd:' (or 's:') .. id (protocol.py)
  caps_skip = string.len(KEYS[KEY_ENTITLEMENT]) - string.len('ent') + string.len('d:')
end

-- Whether cap `c` has no room for one more member. Its count is read once a batch (ZCARD,
-- then the batch's own additions are added as they are accepted) and includes members whose
-- record has expired but are still in the set; those only make it larger, so the set is
-- trimmed (ZREMRANGEBYSCORE, once a batch) only when the count reaches the bound: a usage is
-- refused on the exact count of live records, never on expired ones.
local function caps_full(c)
  local n = caps_n[c]
  if not n then
    n = redis.call('ZCARD', KEYS[caps_idx[c]])
  end
  if n >= caps_bound[c] and not caps_trimmed[c] then
    caps_trimmed[c] = true
    n = n - redis.call('ZREMRANGEBYSCORE', KEYS[caps_idx[c]], '-inf', '(' .. int(caps_now))
  end
  caps_n[c] = n
  return n >= caps_bound[c]
end

local function caps_has(c, member)
  local live = caps_live[c][member]
  if live == nil then
    local score = redis.call('ZSCORE', KEYS[caps_idx[c]], member)
    live = score ~= false and tonumber(score) >= caps_now
    caps_live[c][member] = live
  end
  return live
end

-- The cap a usage would pass, or 0 (then its new members are counted as accepted): a new
-- request id (`dedup_key`, the key of a request id without a record; nil for none), a new
-- session (`new_session`), a slice or key of the limits `set[1..nl]` without a live counter.
local function caps_refuse(dedup_key, new_session, set, nl)
  if dedup_key and caps_bound[CAP_REQUEST_IDS] > 0 and caps_full(CAP_REQUEST_IDS) then
    return CAP_REQUEST_IDS
  end
  if new_session and caps_bound[CAP_SESSIONS] > 0 and caps_full(CAP_SESSIONS) then
    return CAP_SESSIONS
  end
  -- one subject per usage: at most one new member per cap
  local new_slice, new_key
  for j = 1, nl do
    local spec = set[j]
    local c = spec.cap
    if c and not caps_has(c, spec.cap_member) then
      if caps_full(c) then return c end
      if c == CAP_SLICES then new_slice = spec.cap_member else new_key = spec.cap_member end
    end
  end
  if dedup_key and caps_bound[CAP_REQUEST_IDS] > 0 then
    caps_n[CAP_REQUEST_IDS] = caps_n[CAP_REQUEST_IDS] + 1
  end
  if new_session and caps_bound[CAP_SESSIONS] > 0 then
    caps_n[CAP_SESSIONS] = caps_n[CAP_SESSIONS] + 1
  end
  -- counted as live for the rest of the batch; in the set once a counter of it is written
  if new_slice then
    caps_live[CAP_SLICES][new_slice] = true
    caps_n[CAP_SLICES] = caps_n[CAP_SLICES] + 1
  end
  if new_key then
    caps_live[CAP_KEYS][new_key] = true
    caps_n[CAP_KEYS] = caps_n[CAP_KEYS] + 1
  end
  return 0
end

-- A dedup record or a session (`cap`) was written at KEYS[idx], kept for `ttl_ms`.
local function caps_record_written(cap, idx, ttl_ms)
  if caps_bound[cap] > 0 then
    caps_add[cap][sub(KEYS[idx], caps_skip + 1)] = caps_now + ttl_ms
  end
end

-- A counter of `spec` was written, kept for `ttl_ms` (nil: deleted, nothing to extend).
local function caps_counter_written(spec, ttl_ms)
  local c = spec.cap
  if c and ttl_ms then
    local score = caps_now + ttl_ms
    local add = caps_add[c]
    local was = add[spec.cap_member]
    if not was or was < score then add[spec.cap_member] = score end
  end
end

-- Write the members added or moved, and keep each set until its last member expires.
local function caps_close()
  for c = 1, CAP_COUNT do
    local args, n, last = {}, 0, 0
    for member, score in pairs(caps_add[c]) do
      args[n + 1], args[n + 2] = int(score), member
      n = n + 2
      if score > last then last = score end
    end
    if n > 0 then
      local key = KEYS[caps_idx[c]]
      -- a slice or key keeps its latest expiry (GT); a record's expiry only moves forward
      redis.call('ZADD', key, 'GT', unpack(args, 1, n))
      local ttl = redis.call('PTTL', key)
      if ttl < 0 or caps_now + ttl < last then redis.call('PEXPIREAT', key, int(last)) end
    end
  end
end
