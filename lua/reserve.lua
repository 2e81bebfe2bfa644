--[[ Reserve (hold) credits for a long task: the first phase of a two-phase transfer.
  The hold takes its amount from the grants now (burn-down order) so that what is
  held cannot expire or be spent by someone else; release.lua settles it.
  KEYS[1..11]  the organization's fixed keys (see lib.lua)
  KEYS[12]     idempotency record (only when ARGV[10] is not empty)
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
]]
local cred = ARGV[4]
local default_rate, default_burst = tonumber(ARGV[5]), tonumber(ARGV[6])
local starts = {day = tonumber(ARGV[7]), week = tonumber(ARGV[8]), month = tonumber(ARGV[9])}
local fp, idem_ttl_ms = ARGV[10], tonumber(ARGV[11])
local amount, ttl_ms = tonumber(ARGV[12]), tonumber(ARGV[13])
local dept, action, metadata, rid = ARGV[14], ARGV[15], ARGV[16], ARGV[17]

if not loaded() then return reply(NOT_LOADED, {}) end
local replay = idem_check(12, fp)
if replay then return replay end

local c = cred_state(cred)
if c.revoked then return reply(UNAUTHENTICATED, {}) end
local wait_ms = rate_take(cred, default_rate, default_burst, c)
if wait_ms > 0 then return reply(RATE_LIMITED, {retry_after_ms = wait_ms}) end

sweep_holds(starts)
purge_closed_holds()
local live, expired, usable = scan_grants()
expire_grants(expired)

local d = nil
if dept ~= '' then
  d = dept_state(dept, starts)
  if not d then return reply(DEPARTMENT_NOT_FOUND, {}) end
end
if amount > usable then
  return reply(INSUFFICIENT_CREDITS, {available = usable, needed = amount})
end
if d and d.limit >= 0 and d.spent + amount > d.limit then
  return reply(DEPARTMENT_LIMIT, {remaining = dept_room(d), needed = amount})
end
if c.cap >= 0 and c.spent + amount > c.cap then
  return reply(CAP_EXCEEDED, {remaining = cred_room(c), needed = amount})
end

local alloc = take(live, amount)
flush_grants(live)
local pstart = 0
if d then
  d.spent = d.spent + amount
  pstart = d.pstart
  dept_write(dept, d)
end
redis.call('HINCRBY', KEYS[K_CREDS], cred .. '|spent', amount)
local expires_ms = NOW + ttl_ms
redis.call('HSET', KEYS[K_HOLDS], rid, pack({a = amount, al = alloc, d = dept, ps = pstart,
  k = cred, x = expires_ms, st = 'open', u = 0, act = action}))
redis.call('ZADD', KEYS[K_HX], expires_ms, rid)
local res = redis.call('HINCRBY', KEYS[K_ACCT], 'res', amount)
local bal = num(redis.call('HGET', KEYS[K_ACCT], 'bal'))
emit({t = 'hold', id = rid, r = rid, amt = amount, x = expires_ms, d = dept, k = cred,
      act = action, m = metadata, g = alloc, at = NOW})
local payload = {id = rid, amount = amount, expires_ms = expires_ms, balance = bal,
                 available = bal - res}
idem_store(12, fp, payload, idem_ttl_ms)
return reply(OK, payload)
