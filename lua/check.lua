--[[ May this credential use a feature? Read from the cached entitlements only.
  KEYS[1..12]  the organization's fixed keys (see lib.lua)
  KEYS[13]     the organization's entitlements hash (see lib.lua, entitlement_gate)
  ARGV[1] organization id        ARGV[2] now (ms)            ARGV[3] call id
  ARGV[4] credential id          ARGV[5] default rate        ARGV[6] default burst
  ARGV[7] feature
  Returns {status, msgpack payload}:
    OK {ent = {t, e?, l?, u?, v?, ok, why?}}  (ok = 0: refused, why says so)
    ENTITLEMENTS_NOT_LOADED {}  (load them from Postgres, then call again)
    UNAUTHENTICATED | RATE_LIMITED {retry_after_ms}
  Writes nothing but the credential's request token.
]]
local cred, default_rate, default_burst, feature = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]

-- A credential's state is known once the organization is loaded (not needed to answer).
if cred ~= '' and loaded() then
  local c = cred_state(cred)
  if c.revoked then return reply(UNAUTHENTICATED, {}) end
  local wait_ms = rate_take(cred, default_rate, default_burst, c)
  if wait_ms > 0 then return reply(RATE_LIMITED, {retry_after_ms = wait_ms}) end
end
local gate = entitlement_gate(13, feature)
if not gate then return reply(ENTITLEMENTS_NOT_LOADED, {}) end
return reply(OK, {ent = gate})
