-- specs.lua: the limit specs of a payload, as tables with named fields
-- (`-- #include lib/specs.lua`). The layout (SPEC_SLOTS values per spec) is documented in
-- chargepath/store/protocol.py; every number in it was computed by the gateway (core), none
-- here.

-- The spec whose values start after offset `o` of the flat array `values`:
--   idx (key index), kind, soft, name, and
--   for a rate: capacity_sub (sub-units), scale (sub-units per unit), refill_per_ms
--     (sub-units), capacity (units);
--   for a quota: amount (units), period (code), grants_idx (key index of its grants),
--     capacity (0 until its grants are known: decide.lua sets it).
local function read_spec(values, o)
  if values[o + SPEC_KIND] == KIND_RATE then
    return {idx = values[o + SPEC_KEY], kind = KIND_RATE, soft = values[o + SPEC_SOFT] == 1,
      name = values[o + SPEC_NAME], capacity_sub = values[o + RATE_CAPACITY_SUB],
      scale = values[o + RATE_SCALE], refill_per_ms = values[o + RATE_REFILL_PER_MS],
      capacity = values[o + RATE_CAPACITY]}
  end
  return {idx = values[o + SPEC_KEY], kind = KIND_QUOTA, soft = values[o + SPEC_SOFT] == 1,
    name = values[o + SPEC_NAME], amount = values[o + QUOTA_AMOUNT],
    period = values[o + QUOTA_PERIOD], grants_idx = values[o + QUOTA_GRANTS_KEY], capacity = 0}
end
