-- specs.lua: the limit specs of a payload, as tables with named fields
-- (`-- #include lib/specs.lua`). The layout (SPEC_SLOTS values per spec) is documented in
-- chargepath/store/protocol.py; every number in it was computed by the gateway (core), none
-- here.

-- The spec whose values start after offset `o` of the flat array `values`:
--   idx (key index), kind, soft, name, and
--   for a rate: capacity_sub (sub-units), scale (sub-units per unit), refill_per_ms
--     (sub-units), capacity (units);
--   for a quota: amount (units), period (code), grants_idx (key index of its grants).
local function read_spec(values, o)
  local spec = {idx = values[o + SPEC_KEY], kind = values[o + SPEC_KIND],
    soft = values[o + SPEC_SOFT] == 1, name = values[o + SPEC_NAME]}
  if spec.kind == KIND_RATE then
    spec.capacity_sub, spec.scale = values[o + RATE_CAPACITY_SUB], values[o + RATE_SCALE]
    spec.refill_per_ms, spec.capacity = values[o + RATE_REFILL_PER_MS], values[o + RATE_CAPACITY]
  else
    spec.amount, spec.period = values[o + QUOTA_AMOUNT], values[o + QUOTA_PERIOD]
    spec.grants_idx = values[o + QUOTA_GRANTS_KEY]
  end
  return spec
end
