--[[ Release a reservation: charge what was used (at most the hold), free the rest.
  Release, expiry and a second release resolve exactly once: the first to run closes
  the hold; every later one gets RESERVATION_CLOSED (or the stored first result when it
  carries the same idempotency key).
  KEYS[1..11]  the organization's fixed keys (see lib.lua)
  KEYS[12]     idempotency record (only when ARGV[10] is not empty)
  ARGV[1] organization id        ARGV[2] now (ms)            ARGV[3] call id
  ARGV[4] credential id          ARGV[5] default rate        ARGV[6] default burst
  ARGV[7..9] current day / week / month start (ms)
  ARGV[10] idempotency fingerprint ('' = none)               ARGV[11] idempotency ttl (ms)
  ARGV[12] reservation id        ARGV[13] used (millicredits, >= 0)
  Returns {status, msgpack payload}:
    OK      {id, used, released, balance, available}
    REPLAY | NOT_LOADED | IDEMPOTENCY_CONFLICT | UNAUTHENTICATED | RATE_LIMITED
    NOT_FOUND | RESERVATION_CLOSED {how = released|expired, used}
    USED_EXCEEDS_HOLD {amount}
]]
local cred = ARGV[4]
local default_rate, default_burst = tonumber(ARGV[5]), tonumber(ARGV[6])
local starts = {day = tonumber(ARGV[7]), week = tonumber(ARGV[8]), month = tonumber(ARGV[9])}
local fp, idem_ttl_ms = ARGV[10], tonumber(ARGV[11])
local rid, used = ARGV[12], tonumber(ARGV[13])

if not loaded() then return reply(NOT_LOADED, {}) end
local replay = idem_check(12, fp)
if replay then return replay end

local c = cred_state(cred)
if c.revoked then return reply(UNAUTHENTICATED, {}) end
local wait_ms = rate_take(cred, default_rate, default_burst, c)
if wait_ms > 0 then return reply(RATE_LIMITED, {retry_after_ms = wait_ms}) end

-- Expiry first: a release that arrives after the TTL finds the hold already closed.
sweep_holds(starts)
local raw = redis.call('HGET', KEYS[K_HOLDS], rid)
if not raw then return reply(NOT_FOUND, {}) end
local h = unpack(raw)
if h.st == 'open' and h.x <= NOW then
  close_hold(rid, h, 0, 'expired', starts, rid .. '.expired')
end
if h.st ~= 'open' then
  return reply(RESERVATION_CLOSED, {how = h.st, used = h.u})
end
if used > h.a then return reply(USED_EXCEEDS_HOLD, {amount = h.a}) end

local released = close_hold(rid, h, used, 'released', starts, rid .. '.released')
-- A returned part whose grant expired meanwhile expires now, with its own event.
local _, expired = scan_grants()
expire_grants(expired)
local v = redis.call('HMGET', KEYS[K_ACCT], 'bal', 'res')
local bal, res = num(v[1]), num(v[2])
local payload = {id = rid, used = used, released = released, balance = bal,
                 available = bal - res}
idem_store(12, fp, payload, idem_ttl_ms)
return reply(OK, payload)
