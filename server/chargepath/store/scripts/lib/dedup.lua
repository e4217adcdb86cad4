-- dedup.lua: resends recognised, by request id or by session sequence, for decide.lua
-- (`-- #include lib/dedup.lua`).
--
-- A request id's record (a string key, kept for the dedup window):
--   "fingerprint|decision|reason|retry_after_ms|recorded|decision_id[|t]", recorded being
--   VERDICT_RECORDED or 0; "|t" (told) ends a refusal (not recorded) that a resend was
--   answered from: a caller knows the refusal, so the spool's replay never records over it
--   (decide.lua).
-- A session (a string key, kept for the session ttl): its highest sequence
-- (SESSION_SEQ_DIGITS digits), then W slots of SESSION_SLOT bytes (W = the session replay
-- window); slot seq % W holds the verdict of sequence seq: sequence (SESSION_SEQ_DIGITS
-- digits), decision, reason, recorded (a digit each), retry_after_ms (SESSION_RETRY_DIGITS
-- digits), decision_id (SESSION_ID_CHARS characters, space-padded), the usage's fingerprint
-- (SESSION_FP_CHARS characters, of its request id and content: a resend has the slot's, a
-- reused sequence another one).
-- Slots of consecutive sequences are adjacent: they are written as one SETRANGE per run.

-- #include lib/numbers.lua

-- The verdict a request id's record holds: decision, reason, retry_after_ms, verdict flags,
-- decision id, whether a refusal was told (the record's "|t"), and the record; or DENY
-- INVALID_USAGE with VERDICT_CONFLICT when the id was used for another usage (another
-- fingerprint); nil when the id is new.
local function dedup_replay(key, fingerprint)
  local rec = redis.call('GET', key)
  if not rec then return nil end
  local f = split_bars(rec)
  if f[1] ~= fingerprint then
    return DENY, INVALID_USAGE, 0, VERDICT_CONFLICT, f[6]
  end
  return tonumber(f[2]), tonumber(f[3]), tonumber(f[4]), VERDICT_REPLAYED + tonumber(f[5]), f[6],
    f[7] == 't', rec
end

-- A resend was answered from the refusal record `rec` at `key` (flags VERDICT_REPLAYED: not
-- recorded): mark it told, once, keeping its time to live.
local function dedup_told(key, rec, told)
  if not told then redis.call('SET', key, rec .. '|t', 'KEEPTTL') end
end

local function dedup_remember(key, fingerprint, d, r, retry_s, recorded, did, window_ms)
  redis.call('SET', key, fingerprint .. '|' .. DIGIT[d] .. '|' .. DIGIT[r] .. '|' .. retry_s
    .. '|' .. DIGIT[recorded] .. '|' .. did, 'PX', window_ms)
end

local sessions = {}        -- session key index -> highest sequence
local sessions_dirty = {}  -- session key index -> true when its header must be written
-- session key index -> {offset, next sequence, piece count, pieces of the slots...}
local runs = {}

local function session_hw(idx)
  local hw = sessions[idx]
  if hw == nil then
    local raw = redis.call('GETRANGE', KEYS[idx], 0, SESSION_SEQ_DIGITS - 1)
    hw = raw ~= '' and tonumber(raw) or -1
    sessions[idx] = hw
  end
  return hw
end

local function flush_run(idx)
  local run = runs[idx]
  if run then
    redis.call('SETRANGE', KEYS[idx], run[1], concat(run, '', 4, 3 + run[3]))
    runs[idx] = nil
  end
end

-- A usage's fingerprint as a slot holds it (the engine sends SESSION_FP_CHARS characters).
local function session_fp(fp)
  if string.len(fp) == SESSION_FP_CHARS then return fp end
  return format(SESSION_FP_FORMAT, sub(fp, 1, SESSION_FP_CHARS))
end

-- The verdict (as dedup_replay's) of sequence `seq`, at most the session's highest sequence
-- (session_hw), of the session at KEYS[idx]; nil when it is new. Within the window, slot
-- seq % W holds this sequence if it was decided, or an older one if it never was (e.g.
-- answered degraded, or skipped): then it is decided now, as new. A slot of this sequence
-- with another fingerprint (`fp`, as session_fp gives it) was another usage: refused, DENY
-- INVALID_USAGE with VERDICT_CONFLICT and that usage's decision id, never answered from its
-- record. Beyond the window nothing is known, and guessing could lose or double usage:
-- refused, DENY INVALID_USAGE with VERDICT_WINDOW_MISS.
local function session_replay(idx, seq, window, fp)
  if session_hw(idx) - seq >= window then
    return DENY, INVALID_USAGE, 0, VERDICT_WINDOW_MISS, nil
  end
  flush_run(idx)
  local off = SESSION_SEQ_DIGITS + (seq % window) * SESSION_SLOT
  local slot = redis.call('GETRANGE', KEYS[idx], off, off + SESSION_SLOT - 1)
  if string.len(slot) == SESSION_SLOT
    and tonumber(sub(slot, 1, SESSION_SEQ_DIGITS)) == seq then
    local p = SESSION_SEQ_DIGITS
    local did = sub(slot, SESSION_SLOT_ID + 1, SESSION_SLOT_ID + SESSION_ID_CHARS)
    if sub(slot, SESSION_SLOT - SESSION_FP_CHARS + 1, SESSION_SLOT) ~= fp then
      return DENY, INVALID_USAGE, 0, VERDICT_CONFLICT, did
    end
    return tonumber(sub(slot, p + 1, p + 1)), tonumber(sub(slot, p + 2, p + 2)),
      tonumber(sub(slot, p + 4, p + 3 + SESSION_RETRY_DIGITS)),
      VERDICT_REPLAYED + tonumber(sub(slot, p + 3, p + 3)), did
  end
  return nil
end

-- Remember the verdict of sequence `seq` in its slot (and the session's highest sequence);
-- `fp` as session_fp gives it.
local function session_remember(idx, seq, d, r, recorded, retry, did, window, fp)
  local padded = did
  if string.len(did) ~= SESSION_ID_CHARS then padded = format(SESSION_ID_FORMAT, did) end
  local retry_s = SESSION_RETRY_ZERO
  if retry > 0 then retry_s = format(SESSION_RETRY_FORMAT, math.min(retry, SESSION_RETRY_MAX)) end
  local run = runs[idx]
  local pos = seq % window
  if not (run and run[2] == seq and pos ~= 0) then
    flush_run(idx)
    run = {SESSION_SEQ_DIGITS + pos * SESSION_SLOT, seq, 0}
    runs[idx] = run
  end
  local n = run[3]
  run[n + 4], run[n + 5], run[n + 6] = format(SESSION_SEQ_FORMAT, seq), DIGIT[d], DIGIT[r]
  run[n + 7], run[n + 8], run[n + 9], run[n + 10] = DIGIT[recorded], retry_s, padded, fp
  run[2], run[3] = seq + 1, n + 7
  if seq > session_hw(idx) then
    sessions[idx] = seq
  end
  sessions_dirty[idx] = true
end

-- Write every pending run of slots, and the header of every session written to.
local function sessions_close(ttl_ms)
  for idx, _ in pairs(runs) do
    flush_run(idx)
  end
  for idx, _ in pairs(sessions_dirty) do
    redis.call('SETRANGE', KEYS[idx], 0, format(SESSION_SEQ_FORMAT, sessions[idx]))
    redis.call('PEXPIRE', KEYS[idx], ttl_ms)
  end
end
