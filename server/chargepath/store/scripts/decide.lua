-- decide.lua: decide a batch of usages of ONE tenant, atomically, on Redis' clock.
--
-- Invariants kept (DESIGN properties 1-5):
--  * All-or-nothing admit: units are taken from every matching limit, or from none.
--  * A report is always debited (a bucket may go into debt) and recorded.
--  * The dedup record (request id or session sequence), the debits and the ledger entry (or
--    the ledger aggregate) are written in this one script: an id is never marked seen unless
--    its effect is written, and nothing recorded is ever left out of the ledger.
--  * A gateway deciding with a policy version older than the tenant's stamp is refused (STALE)
--    before anything is written, so no decision uses a version older than the last change.
--  * A batch that comes to run past its deadline (ARGV[ARG_DEADLINE], on Redis' clock: when
--    the gateway stops waiting and answers by the failure policy) writes nothing and replies
--    REPLY_LATE, so a caller answered degraded is not recorded behind its back.
--  * A session usage of a batch that runs past its doubt time (ARGV[ARG_DOUBT], on Redis'
--    clock: its caller may have been answered by the failure policy, and the usage spooled,
--    before this reply is read) is also checked against its request id's dedup record, and
--    writes it with the session slot: the spool's replay (by request id) finds it whatever
--    the session window says, and a replay that ran first is found by this batch.
--  * A replay of spooled usages (ARGV[ARG_REPLAY] "1") is never refused by a cap: its usages
--    were acknowledged to their callers already. A replayed usage whose request-id record
--    holds a refusal (not recorded) with the usage's own decision id (its first attempt,
--    decided late, after the gateway had answered it ALLOW by the failure policy) is
--    recorded, and the record rewritten to say so; a record that says recorded is answered
--    from, never recorded twice. A resend answered from a refusal record marks it told
--    (lib/dedup.lua): a replay never records over a refusal a caller was answered.
--  * A usage that would pass one of the tenant's caps (live request ids, sessions, slices,
--    keys: lib/caps.lua) is refused, DENY CAP_REACHED, and writes nothing but its trail
--    record; a tenant the policy does not name gets no trail either (the gateway sends
--    ARGV[ARG_RECENT_LENGTH] 0), so its usages write nothing at all.
--  * Time is Redis TIME (+ the clock offset, 0 outside tests); all amounts are integers
--    (lib/numbers.lua says how they stay exact).
--
-- The numbers named in capitals (KEY_*, ARG_*, SPEC_*, USAGE_*, VERDICT_*, enum codes) come
-- from chargepath/store/protocol.py, which also documents the payload and the reply in full.
--
-- KEYS[KEY_ENTITLEMENT]  tenant entitlement hash ("v" = policy version stamped by the last
--                        publish)
-- KEYS[KEY_LEDGER]       tenant ledger stream (lib/ledger.lua)
-- KEYS[KEY_RECENT]       tenant recent-decisions stream (lib/trail.lua; every decision of the
--                        explain window ARGV[ARG_EXPLAIN_WINDOW], and about
--                        ARGV[ARG_RECENT_LENGTH] beyond it)
-- KEYS[KEY_AGGREGATES]   tenant ledger aggregates hash (lib/ledger.lua)
-- KEYS[5..]              dedup, session, bucket, quota and grant keys, and the caps' counts,
--                        by index from the payload
--
-- ARGV[ARG_POLICY_VERSION]  policy version the gateway decided with
-- ARGV[ARG_CLOCK_OFFSET]    clock offset, ms
-- ARGV[ARG_DEDUP_WINDOW]    dedup window, ms
-- ARGV[ARG_SESSION_TTL]     session ttl, ms
-- ARGV[ARG_SESSION_WINDOW]  session replay window W (slots kept per session)
-- ARGV[ARG_RECENT_LENGTH]   recent-decisions trail length, in decisions (approximate; 0: none)
-- ARGV[ARG_PAYLOAD]         MessagePack {specs, sets, subjects, usages, caps} (one argument instead
--                           of thousands: packing and parsing them dominated)
-- ARGV[ARG_FULL_VIEW]       "0": basic view, a decision with reason OK replies no limits;
--                           else every decision replies its limits. The trail keeps them
--                           either way.
-- ARGV[ARG_DEADLINE]        the batch's deadline on Redis' clock (TIME, without the clock
--                           offset), ms; 0: none
-- ARGV[ARG_DOUBT]           the batch's doubt time on Redis' clock (TIME), ms; 0: never
-- ARGV[ARG_REPLAY]          "1": a replay of spooled usages (no caps), else "0"
-- ARGV[ARG_EXPLAIN_WINDOW]  how long the trail keeps every decision, ms (at most the dedup
--                           window; 0: only about ARGV[ARG_RECENT_LENGTH] decisions)
--
-- Reply: {REPLY_STALE, stamped_version} when the tenant's stamp is newer than the version
-- (nothing written), {REPLY_LATE, time_ms} when TIME is past the deadline (nothing written),
-- else {REPLY_DECIDED, now_ms, then per usage: code, retry_after_ms,
-- [the record's decision id | the cap reached], then per limit: remaining, reset_after_ms,
-- [a quota's capacity]} (see protocol.py).

redis.replicate_commands()

-- #include lib/numbers.lua
-- #include lib/specs.lua
-- #include lib/bucket.lua
-- #include lib/quota.lua
-- #include lib/dedup.lua
-- #include lib/ledger.lua
-- #include lib/trail.lua
-- #include lib/caps.lua

local stamped = tonumber(redis.call('HGET', KEYS[KEY_ENTITLEMENT], 'v') or '0')
if stamped > tonumber(ARGV[ARG_POLICY_VERSION]) then
  return {REPLY_STALE, stamped}
end

local t = redis.call('TIME')
local real_now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
local deadline = tonumber(ARGV[ARG_DEADLINE])
if deadline > 0 and real_now > deadline then
  return {REPLY_LATE, real_now}
end
local now = real_now + tonumber(ARGV[ARG_CLOCK_OFFSET])
local doubt_ms = tonumber(ARGV[ARG_DOUBT])
local in_doubt = doubt_ms > 0 and real_now > doubt_ms
local replay = ARGV[ARG_REPLAY] == '1'
local now_s = int(now)
local version = ARGV[ARG_POLICY_VERSION]
local dedup_ms = tonumber(ARGV[ARG_DEDUP_WINDOW])
local session_ms = tonumber(ARGV[ARG_SESSION_TTL])
local window = tonumber(ARGV[ARG_SESSION_WINDOW])
local recent_len = tonumber(ARGV[ARG_RECENT_LENGTH])
local explain_ms = tonumber(ARGV[ARG_EXPLAIN_WINDOW])
local full_view = ARGV[ARG_FULL_VIEW] ~= '0'
local payload = cmsgpack.unpack(ARGV[ARG_PAYLOAD])
local specs_in, sets_in, subjects, batch = payload[1], payload[2], payload[3], payload[4]

-- Specs, once per batch (lib/specs.lua). Their counter state (`st`) is loaded when a decision
-- first needs it; `capacity` is a quota's amount plus its live grants once loaded; `pre`,
-- `last_v`, `last_s` are the trail's texts of it (lib/trail.lua).
local specs = {}
for s = 1, #specs_in / SPEC_SLOTS do
  local spec = read_spec(specs_in, SPEC_SLOTS * (s - 1))
  spec.st, spec.pre, spec.last_v, spec.last_s = false, false, false, ''
  specs[s] = spec
end
local sets = {}
for n, members in ipairs(sets_in) do
  local set = {}
  for j, s in ipairs(members) do set[j] = specs[s] end
  sets[n] = set
end
caps_open(payload[5], specs, real_now)

-- Counter states by key index, loaded once and written back at the end. Two specs naming the
-- same key share its state.
local states = {}

local function bind(spec)
  local st = states[spec.idx]
  if not st then
    local key = KEYS[spec.idx]
    if spec.kind == KIND_RATE then
      st = {spec = spec, level = bucket_read(key, spec, now), dirty = false}
    else
      local start, finish, used = quota_read(key, spec.period, now)
      local granted = 0
      if spec.grants_idx > 0 then granted = quota_grants(KEYS[spec.grants_idx], start, now) end
      st = {spec = spec, start = start, finish = finish, used = used, granted = granted,
        dirty = false}
    end
    states[spec.idx] = st
  end
  if spec.kind == KIND_QUOTA then spec.capacity = spec.amount + st.granted end
  spec.st = st
  return st
end

-- Per limit of the usage being decided (reused, never reallocated): remaining units before
-- and after, exceeded or not, a quota's used units before.
local befores, afters, exceeded, used_before = {}, {}, {}, {}

-- 2 and 3: the decision, reason and retry_after of an entitled usage with the limits
-- `set[1..nl]`, and whether `amount` was taken. An admit is taken only if it fits every limit;
-- a report is always debited, then checked.
local function decide_limits(set, nl, amount, report, suspended)
  local before, over, used0 = befores, exceeded, used_before
  for j = 1, nl do
    local spec = set[j]
    local st = spec.st or bind(spec)
    -- remaining units: a bucket's whole units, a quota's capacity less its used units
    if spec.kind == KIND_RATE then
      before[j] = floor(st.level / spec.scale)
    else
      used0[j], before[j] = st.used, spec.capacity - st.used
    end
    over[j] = false
  end

  local never, quota_out, soft_crossed, rate_wait, quota_wait = false, false, false, 0, 0
  local take = report
  if not report then
    -- 2. Which limits the amount does not fit now.
    for j = 1, nl do
      local spec = set[j]
      local st = spec.st
      local fits, cannot, wait = true, false, 0
      if spec.kind == KIND_RATE then
        local need = amount * spec.scale
        if need > spec.capacity_sub then
          fits, cannot = false, true
        elseif st.level < need then
          fits, wait = false, bucket_wait(need, st.level, spec.refill_per_ms)
        end
      elseif amount > spec.capacity then
        fits, cannot = false, true
      elseif spec.capacity - st.used < amount then
        fits, wait = false, st.finish - now
      end
      if not fits then
        over[j] = true
        if spec.soft then
          soft_crossed = true
        elseif cannot then
          never = true
        elseif spec.kind == KIND_RATE then
          rate_wait = math.max(rate_wait, wait)
        else
          quota_out = true
          quota_wait = math.max(quota_wait, wait)
        end
      end
    end
    take = not (never or quota_out or rate_wait > 0)
  end

  -- 3. Take (admit: only if everything fits) or debit (report: always).
  if take then
    for j = 1, nl do
      local spec = set[j]
      local st = spec.st
      if spec.kind == KIND_RATE then
        st.level = bucket_debit(st.level, amount * spec.scale)
      else
        st.used = st.used + amount
      end
      st.dirty = true
    end
  end

  if report then
    -- Which limits the report took over.
    for j = 1, nl do
      local spec = set[j]
      local st = spec.st
      if spec.kind == KIND_RATE then
        if st.level < 0 then
          over[j] = true
          if spec.soft then soft_crossed = true
          else rate_wait = math.max(rate_wait, bucket_wait(0, st.level, spec.refill_per_ms)) end
        end
      else
        local rem = spec.capacity - st.used
        if spec.soft and rem < 0 then
          over[j], soft_crossed = true, true
        elseif not spec.soft and rem <= 0 then
          over[j], quota_out = true, true
          quota_wait = math.max(quota_wait, st.finish - now)
        end
      end
    end
  end

  if suspended then return DENY, SUSPENDED, 0, take end
  if never then return DENY, AMOUNT_EXCEEDS_CAPACITY, 0, take end
  if quota_out then return DENY, QUOTA_EXHAUSTED, quota_wait, take end
  if rate_wait > 0 then return THROTTLE, RATE_LIMITED, rate_wait, take end
  if soft_crossed then return ALLOW, SOFT_LIMIT_EXCEEDED, 0, take end
  return ALLOW, OK, 0, take
end

local reply = {REPLY_DECIDED, now}
local rn = 2
local ledger_suffix = US .. version .. US .. now_s
local NO_LIMITS = {}
if recent_len > 0 then trail_open(version, now_s) end

for o = 0, #batch - 1, USAGE_SLOTS do
  local flags, amount = batch[o + USAGE_FLAGS], batch[o + USAGE_AMOUNT]
  local kidx, seq = batch[o + USAGE_DEDUP_KEY], batch[o + USAGE_SEQUENCE]
  local fp, did = batch[o + USAGE_FINGERPRINT], batch[o + USAGE_DECISION_ID]
  local report = flags % (2 * USAGE_REPORT) >= USAGE_REPORT
  local entitled = flags % (2 * USAGE_ENTITLED) >= USAGE_ENTITLED
  local suspended = flags % (2 * USAGE_SUSPENDED) >= USAGE_SUSPENDED
  local dedup_idx, sess_idx, doubt_idx = kidx, 0, 0
  if flags >= USAGE_SESSION then
    dedup_idx, sess_idx = 0, kidx
    if in_doubt then doubt_idx = batch[o + USAGE_DOUBT_KEY] end
  end

  -- 1. A resend: answer from the record, change nothing.
  local rd, rr, rt, rf, rdid, told, rec
  if dedup_idx > 0 then
    rd, rr, rt, rf, rdid, told, rec = dedup_replay(KEYS[dedup_idx], fp)
    if rf == VERDICT_REPLAYED then  -- a refusal, not recorded
      if not replay then
        dedup_told(KEYS[dedup_idx], rec, told)
      elseif rdid == did and not told then
        -- the spooled usage's own first attempt (same request id, fingerprint and decision
        -- id), decided late by this store as a refusal after the gateway had answered it by
        -- the failure policy and spooled it: an ALLOW (fail-open) the caller acted on, and
        -- no resend was told the refusal. The replay records the usage now, and its record
        -- replaces this one (step 4).
        rd = nil
      end
    end
  elseif sess_idx > 0 and seq <= session_hw(sess_idx) then
    fp = session_fp(fp)
    rd, rr, rt, rf, rdid = session_replay(sess_idx, seq, window, fp)
  end
  if not rd and doubt_idx > 0 then
    -- in doubt: a replay of this usage from the spool (same request id and fingerprint) may
    -- have recorded it already
    fp = session_fp(fp)
    rd, rr, rt, rf, rdid, told, rec = dedup_replay(KEYS[doubt_idx], fp)
    if rf == VERDICT_REPLAYED then dedup_told(KEYS[doubt_idx], rec, told) end
  end

  if rd then
    reply[rn + 1] = rd + REASON_UNIT * rr + FLAGS_UNIT * rf
    reply[rn + 2] = rt
    rn = rn + 2
    if rf % (2 * VERDICT_REPLAYED) >= VERDICT_REPLAYED or rf == VERDICT_CONFLICT then
      rn = rn + 1
      reply[rn] = rdid or ''
    end
  else
    local set, nl = NO_LIMITS, 0
    local decision, reason, retry, take
    local cap = 0
    if not entitled then
      decision, reason, retry, take = DENY, NO_ENTITLEMENT, 0, false
    elseif suspended and not report then
      decision, reason, retry, take = DENY, SUSPENDED, 0, false
    else
      local set_no = batch[o + USAGE_SET]
      if set_no > 0 then
        set = sets[set_no]
        nl = #set
      end
      if not replay then
        cap = caps_refuse(dedup_idx > 0 and KEYS[dedup_idx],
          sess_idx > 0 and session_hw(sess_idx) < 0, set, nl)
      end
      if cap > 0 then
        set, nl = NO_LIMITS, 0
        decision, reason, retry, take = DENY, CAP_REACHED, 0, false
      else
        decision, reason, retry, take = decide_limits(set, nl, amount, report, suspended)
      end
    end
    local recorded = take and VERDICT_RECORDED or 0
    local text = batch[o + USAGE_TEXT]
    local retry_s = retry == 0 and '0' or int(retry)

    -- 4. Ledger entry (or aggregate) and dedup record, in the same step as the debits.
    if take then
      local agg_ms = batch[o + USAGE_AGGREGATE_MS]
      if agg_ms > 0 then
        ledger_aggregate(KEYS[KEY_AGGREGATES], agg_ms, now, amount, batch[o + USAGE_LEDGER_TAIL])
      else
        ledger_append(KEYS[KEY_LEDGER], text, decision, reason, ledger_suffix,
          batch[o + USAGE_LEDGER_TAIL])
      end
    end
    if entitled and cap == 0 then
      if dedup_idx > 0 then
        dedup_remember(KEYS[dedup_idx], fp, decision, reason, retry_s, recorded, did, dedup_ms)
        caps_record_written(CAP_REQUEST_IDS, dedup_idx, dedup_ms)
      elseif sess_idx > 0 then
        session_remember(sess_idx, seq, decision, reason, recorded, retry, did, window,
          session_fp(fp))
        caps_record_written(CAP_SESSIONS, sess_idx, session_ms)
        if doubt_idx > 0 then
          dedup_remember(KEYS[doubt_idx], session_fp(fp), decision, reason, retry_s, recorded,
            did, dedup_ms)
          caps_record_written(CAP_REQUEST_IDS, doubt_idx, dedup_ms)
        end
      end
    end

    -- 5. The reply: code, retry, and per limit remaining, reset (and a quota's capacity); in
    --    the basic view, a decision with reason OK replies no limits. The trail: remaining
    --    before and after, and quota thresholds crossed.
    local with_limits = full_view or reason ~= OK
    reply[rn + 1] = decision + REASON_UNIT * reason + FLAGS_UNIT * recorded
      + LIMITS_UNIT * (with_limits and nl or 0)
    reply[rn + 2] = retry
    rn = rn + 2
    if cap > 0 then
      rn = rn + 1
      reply[rn] = cap
    end
    for j = 1, nl do
      local spec = set[j]
      local st = spec.st
      local after, reset
      if spec.kind == KIND_RATE then
        after = floor(st.level / spec.scale)
        if with_limits then reset = bucket_wait(spec.capacity_sub, st.level, spec.refill_per_ms) end
      else
        after, reset = spec.capacity - st.used, st.finish - now
      end
      afters[j] = after
      if with_limits then
        reply[rn + 1] = after
        if exceeded[j] then reply[rn + 2] = -1 - reset else reply[rn + 2] = reset end
        rn = rn + 2
        if spec.kind == KIND_QUOTA then
          rn = rn + 1
          reply[rn] = spec.capacity
        end
      end
    end
    if recent_len > 0 then
      trail_decision(text, batch[o + USAGE_TRACE_ID], decision, reason, retry_s, set, nl,
        befores, afters, exceeded, take, used_before, batch[o + USAGE_SUBJECT])
    end
  end
end

trail_close(KEYS[KEY_RECENT], recent_len, subjects, now_s, real_now, explain_ms)

-- 6. Write back every counter that changed.
for idx, st in pairs(states) do
  if st.dirty then
    if st.spec.kind == KIND_RATE then
      caps_counter_written(st.spec, bucket_write(KEYS[idx], st.level, st.spec, now_s))
    else
      caps_counter_written(st.spec, quota_write(KEYS[idx], st.start, st.finish, st.used, now))
    end
  end
end

sessions_close(session_ms)
caps_close()

return reply
