--[[ Take one request token for a credential (endpoints with no script of their own).
  KEYS[1..12]  the organization's fixed keys (see lib.lua)
  ARGV[1] organization id        ARGV[2] now (ms)            ARGV[3] call id
  ARGV[4] credential id          ARGV[5] default rate        ARGV[6] default burst
  Returns {status, msgpack payload}:
    OK {} | NOT_LOADED {} | UNAUTHENTICATED {} | RATE_LIMITED {retry_after_ms}
]]
local cred = ARGV[4]
if not loaded() then return reply(NOT_LOADED, {}) end
local c = cred_state(cred)
if c.revoked then return reply(UNAUTHENTICATED, {}) end
local wait_ms = rate_take(cred, tonumber(ARGV[5]), tonumber(ARGV[6]), c)
if wait_ms > 0 then return reply(RATE_LIMITED, {retry_after_ms = wait_ms}) end
return reply(OK, {})
