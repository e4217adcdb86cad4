-- periods.lua: UTC period boundaries in milliseconds (`-- #include lib/periods.lua`).
-- The Python reference is chargepath/core/periods.py; tests/integration/test_counter_parity.py
-- holds both to the same answers over many years of random instants.

-- Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- The (year, month) of a day number since 1970-01-01.
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m
end

-- [start, end) of the UTC period (PERIOD_HOUR, PERIOD_DAY, PERIOD_WEEK: an ISO week from
-- Monday 00:00, PERIOD_MONTH) containing `at`.
local function period_bounds(at, period)
  if period == PERIOD_HOUR then
    local s = at - at % HOUR_MS
    return s, s + HOUR_MS
  elseif period == PERIOD_DAY then
    local s = at - at % DAY_MS
    return s, s + DAY_MS
  elseif period == PERIOD_WEEK then
    local s = at - (at + WEEK_OFFSET_MS) % WEEK_MS
    return s, s + WEEK_MS
  end
  local y, m = civil_from_days(math.floor(at / DAY_MS))
  local s = days_from_civil(y, m, 1) * DAY_MS
  if m == 12 then y, m = y + 1, 1 else m = m + 1 end
  return s, days_from_civil(y, m, 1) * DAY_MS
end
