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
local gate = entitlement_gate(tonumber(ARGV[18]), ARGV[17])
if not gate then return reply(ENTITLEMENTS_NOT_LOADED, {}) end
if gate.ok == 0 and (ARGV[10] == '' or redis.call('EXISTS', KEYS[13]) == 0) then
  return reply(FEATURE_DENIED, gate)
end
return nil, gate
