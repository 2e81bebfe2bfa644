--[[ Reserve (hold) credits for a long task: the first phase of a two-phase transfer.
  The hold takes its amount from the grants now (burn-down order) so that what is
  held cannot expire or be spent by someone else; release.lua settles it.
  KEYS[1..12]  the organization's fixed keys (see lib.lua)
  KEYS[13]     idempotency record (only when ARGV[10] is not empty)
  KEYS[14]     (optional) the same record's name before (see idem_twin in lib.lua)
  ARGV[1] organization id        ARGV[2] now (ms)            ARGV[3] call id
  ARGV[4] credential id          ARGV[5] default rate        ARGV[6] default burst
  ARGV[7..9] current day / week / month start (ms)
  ARGV[10] idempotency fingerprint ('' = none)               ARGV[11] idempotency ttl (ms)
  ARGV[12] amount (millicredits, >= 1)                       ARGV[13] ttl (ms, >= 1)
  ARGV[14] department id ('' = none)                         ARGV[15] action ('' = none)
  ARGV[16] metadata (JSON text, '' = none)                     ARGV[17] reservation id
  Returns {status, msgpack payload}:
    OK      {id, amount, expires_ms, balance, available}
    REPLAY | NOT_LOADED | IDEMPOTENCY_CONFLICT | UNAUTHENTICATED | RATE_LIMITED
    DEPARTMENT_NOT_FOUND | INSUFFICIENT_CREDITS {available, needed}
    DEPARTMENT_LIMIT {remaining, needed} | CAP_EXCEEDED {remaining, needed}
  A hold may take `available` down to minus the credit line (may_charge): its part past
  the grants (od) is debt at once; what of it the release does not use is returned.
]]
local cred, default_rate, default_burst, starts, fp, idem_ttl_ms = charging_args(ARGV)
idem_twin_after(K_IDEM)  -- the record's name before, when passed
local amount, ttl_ms = tonumber(ARGV[12]), tonumber(ARGV[13])
local dept, action, metadata, rid = ARGV[14], ARGV[15], ARGV[16], ARGV[17]

local early, c = preamble(cred, default_rate, default_burst, starts, fp)
if early then return early end
purge_closed_holds()
sweep_grants()
local usable, bal = usable_now()

local d = nil
if dept ~= '' then
  d = dept_state(dept, starts)
  if not d then return reply(DEPARTMENT_NOT_FOUND, {}) end
end
if not may_charge(amount, usable) then
  return reply(INSUFFICIENT_CREDITS, {available = usable, needed = amount})
end
if d and d.limit >= 0 and d.spent + amount > d.limit then
  return reply(DEPARTMENT_LIMIT, {remaining = dept_room(d), needed = amount})
end
if c.cap >= 0 and c.spent + amount > c.cap then
  return reply(CAP_EXCEEDED, {remaining = cred_room(c), needed = amount})
end
local grants = grants_cursor()
local alloc, od = take_charge(grants, amount)
if not alloc then return reply(INSUFFICIENT_CREDITS, {available = grants.avail, needed = amount}) end

flush_grants(grants)
local pstart = 0
if d then
  d.spent = d.spent + amount
  pstart = d.pstart
  dept_write(dept, d)
end
redis.call('HINCRBY', KEYS[K_CREDS], cred .. '|spent', amount)
local expires_ms = NOW + ttl_ms
redis.call('HSET', KEYS[K_HOLDS], rid, pack({a = amount, al = alloc, d = dept, ps = pstart,
  k = cred, x = expires_ms, st = 'open', u = 0, act = action, o = od > 0 and od or nil}))
redis.call('ZADD', KEYS[K_HX], expires_ms, rid)
local res = redis.call('HINCRBY', KEYS[K_ACCT], 'res', amount)
if od > 0 then redis.call('HINCRBY', KEYS[K_ACCT], 'hod', od) end
emit({t = 'hold', id = rid, r = rid, amt = amount, x = expires_ms, d = dept, k = cred,
      act = action, m = metadata, g = alloc, od = od > 0 and od or nil, at = NOW})
local payload = {id = rid, amount = amount, expires_ms = expires_ms, balance = bal,
                 available = bal - res}
idem_store(K_IDEM, fp, payload, idem_ttl_ms)
return reply(OK, payload)
