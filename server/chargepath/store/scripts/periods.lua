-- periods.lua: UTC period boundaries in milliseconds, included by the scripts that need them
-- (read_script() inlines a line `-- #include periods.lua`). The Python reference is
-- chargepath/core/periods.py; the tests hold both to the same answers.

local HOUR, DAY = 3600000, 86400000

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

-- [start, end) of the UTC period (1 hour, 2 day, 3 month) containing `at`.
local function period_bounds(at, code)
  if code == 1 then
    local s = at - at % HOUR
    return s, s + HOUR
  elseif code == 2 then
    local s = at - at % DAY
    return s, s + DAY
  end
  local y, m = civil_from_days(math.floor(at / DAY))
  local s = days_from_civil(y, m, 1) * DAY
  if m == 12 then y, m = y + 1, 1 else m = m + 1 end
  return s, days_from_civil(y, m, 1) * DAY
end
