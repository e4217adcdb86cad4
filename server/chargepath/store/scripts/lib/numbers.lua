-- numbers.lua: exact integers as text, and integer division; included by the scripts and
-- libraries that need them (`-- #include lib/numbers.lua`).
--
-- Lua numbers are doubles: every value stays below 2^53 (the gateway checks the bounds).
-- Numbers are written as text with string.format('%d') (a C long: exact for every integer
-- double below 2^63), never with Lua's own '%.14g'.

local format, floor, sub, concat = string.format, math.floor, string.sub, table.concat

local function int(x)
  return format('%d', x)
end

-- a / b rounded up, for a >= 0 and b > 0
local function ceil_div(a, b)
  return floor((a + b - 1) / b)
end

-- the text of a one-digit code (decisions, reasons, kinds, flags), without a format call
local DIGIT = {[0] = '0', '1', '2', '3', '4', '5', '6', '7', '8', '9'}

-- the non-empty fields of a '|'-separated record
local function split_bars(s)
  local out = {}
  for part in string.gmatch(s, '[^|]+') do out[#out + 1] = part end
  return out
end

-- (decision, reason) -> "US decision US reason", as ledger entries and trail records hold them
-- (a reason may have two digits: CAP_REACHED is in the trail)
local verdict_texts = {}
local function verdict_text(d, r)
  local k = d * 16 + r
  local s = verdict_texts[k]
  if not s then
    s = US .. DIGIT[d] .. US .. (DIGIT[r] or int(r))
    verdict_texts[k] = s
  end
  return s
end
