--[[ The feature gate of check_consume: lua/__init__.py runs this, then consume.lua,
  in one script (one atomic step: "may this key do this, and charge it").
  KEYS and ARGV: consume.lua's, and
  ARGV[17] feature               ARGV[18] index in KEYS of the entitlements hash
  Returns a reply to give at once, or nil and the gate (consume runs, and its OK or
  REPLAY payload carries the gate as `ent`):
    ENTITLEMENTS_NOT_LOADED {}   (load them from Postgres, then call again)
    FEATURE_DENIED {t, e?, l?, u?, ok = 0, why}   nothing charged
  A retry of a call that was charged (its idempotency record exists) is not refused
  here: consume replays its first answer, whatever the features say now.
]]
local ents = tonumber(ARGV[18])
local gate = entitlement_gate(ents, ARGV[17])
if not gate then return reply(ENTITLEMENTS_NOT_LOADED, {}) end
-- The record: KEYS[13], or during an upgrade its name before, KEYS[14] (given only then,
-- before the entitlements hash).
local recorded = ARGV[10] ~= '' and (redis.call('EXISTS', KEYS[13]) == 1
  or (ents > 14 and redis.call('EXISTS', KEYS[14]) == 1))
if gate.ok == 0 and not recorded then
  return reply(FEATURE_DENIED, gate)
end
return nil, gate
