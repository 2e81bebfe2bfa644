--[[ Consume credits for one action, checking every budget level in one step.
  KEYS[1..12]  the organization's fixed keys (see lib.lua)
  KEYS[13]     idempotency record (only when ARGV[10] is not empty)
  KEYS[14]     (optional) the same record's name before (see idem_twin in lib.lua)
  ARGV[1] organization id        ARGV[2] now (ms)            ARGV[3] call id
  ARGV[4] credential id          ARGV[5] default rate (requests/s, <= 0 unlimited)
  ARGV[6] default burst          ARGV[7..9] current day / week / month start (ms)
  ARGV[10] idempotency fingerprint ('' = none)               ARGV[11] idempotency ttl (ms)
  ARGV[12] action                ARGV[13] units (integer >= 1)
  ARGV[14] department id ('' = none)                         ARGV[15] metadata (JSON text)
  ARGV[16] event id
  Returns {status, msgpack payload}:
    OK      {id, credits, balance, available}     (millicredits)
    REPLAY  the first call's OK payload; nothing charged again
    NOT_LOADED | IDEMPOTENCY_CONFLICT | UNAUTHENTICATED (credential revoked)
    RATE_LIMITED {retry_after_ms} | UNKNOWN_ACTION | DEPARTMENT_NOT_FOUND
    INSUFFICIENT_CREDITS {available, needed} | DEPARTMENT_LIMIT {remaining, needed}
    CAP_EXCEEDED {remaining, needed}
  All checks run before any charge; a refusal charges nothing. `available` may go down
  to minus the credit line (may_charge); the part of a charge past the grants is debt
  (the `use` event's od).
]]
local cred, default_rate, default_burst, starts, fp, idem_ttl_ms = charging_args(ARGV)
idem_twin_after(K_IDEM)  -- the record's name before, when passed
local action, units, dept = ARGV[12], tonumber(ARGV[13]), ARGV[14]
local metadata, event_id = ARGV[15], ARGV[16]

local early, c = preamble(cred, default_rate, default_burst, starts, fp)
if early then return early end
sweep_grants()
local usable, bal, res = usable_now()

local cost = tonumber(redis.call('HGET', KEYS[K_COSTS], action))
if not cost then return reply(UNKNOWN_ACTION, {}) end
local charge = cost * units

local d = nil
if dept ~= '' then
  d = dept_state(dept, starts)
  if not d then return reply(DEPARTMENT_NOT_FOUND, {}) end
end
if not may_charge(charge, usable) then
  return reply(INSUFFICIENT_CREDITS, {available = usable, needed = charge})
end
if d and d.limit >= 0 and d.spent + charge > d.limit then
  return reply(DEPARTMENT_LIMIT, {remaining = dept_room(d), needed = charge})
end
if c.cap >= 0 and c.spent + charge > c.cap then
  return reply(CAP_EXCEEDED, {remaining = cred_room(c), needed = charge})
end
local grants = grants_cursor()
local alloc, od = take_charge(grants, charge)
if not alloc then return reply(INSUFFICIENT_CREDITS, {available = grants.avail, needed = charge}) end

-- Every check passed: charge.
flush_grants(grants)
if d then
  d.spent = d.spent + charge
  dept_write(dept, d)
end
if charge > 0 then
  redis.call('HINCRBY', KEYS[K_CREDS], cred .. '|spent', charge)
  bal = redis.call('HINCRBY', KEYS[K_ACCT], 'bal', 0 - charge)
end
emit({t = 'use', id = event_id, act = action, u = units, amt = charge, d = dept, k = cred,
      m = metadata, g = alloc, od = od > 0 and od or nil, at = NOW})
idem_store_charge(K_IDEM, fp, event_id, charge, bal, bal - res, idem_ttl_ms)
return reply(OK, {id = event_id, credits = charge, balance = bal, available = bal - res})
