--[[ Release a reservation: charge what was used (at most the hold), free the rest.
  Release, expiry and a second release resolve exactly once: the first to run closes
  the hold; every later one gets RESERVATION_CLOSED (or the stored first result when it
  carries the same idempotency key). A hold is released by the credential that made it,
  or by one allowed to release any of the organization's holds (an admin).
  KEYS[1..12]  the organization's fixed keys (see lib.lua)
  KEYS[13]     idempotency record (only when ARGV[10] is not empty)
  KEYS[14]     (optional) the same record's name before (see idem_twin in lib.lua)
  ARGV[1] organization id        ARGV[2] now (ms)            ARGV[3] call id
  ARGV[4] credential id          ARGV[5] default rate        ARGV[6] default burst
  ARGV[7..9] current day / week / month start (ms)
  ARGV[10] idempotency fingerprint ('' = none)               ARGV[11] idempotency ttl (ms)
  ARGV[12] reservation id        ARGV[13] used (millicredits, >= 0)
  ARGV[14] '1' = may release any hold of the organization, '0' = only its own
  Returns {status, msgpack payload}:
    OK      {id, used, released, balance, available}
    REPLAY | NOT_LOADED | IDEMPOTENCY_CONFLICT | UNAUTHENTICATED | RATE_LIMITED
    NOT_FOUND | RESERVATION_CLOSED {how = released|expired, used}
    USED_EXCEEDS_HOLD {amount} | NOT_YOURS {}
]]
local cred, default_rate, default_burst, starts, fp, idem_ttl_ms = charging_args(ARGV)
idem_twin_after(K_IDEM)  -- the record's name before, when passed
local rid, used, any = ARGV[12], tonumber(ARGV[13]), ARGV[14] == '1'

-- (Expiry first, in the preamble: a release that arrives after the TTL finds the hold
-- already closed.)
local early = preamble(cred, default_rate, default_burst, starts, fp)
if early then return early end
local raw = redis.call('HGET', KEYS[K_HOLDS], rid)
if not raw then return reply(NOT_FOUND, {}) end
local h = unpack(raw)
if h.k ~= cred and not any then return reply(NOT_YOURS, {}) end
if h.st == 'open' and h.x <= NOW then
  close_hold(rid, h, 0, 'expired', starts, rid .. '.expired')
end
if h.st ~= 'open' then
  return reply(RESERVATION_CLOSED, {how = h.st, used = h.u})
end
if used > h.a then return reply(USED_EXCEEDS_HOLD, {amount = h.a}) end

local released = close_hold(rid, h, used, 'released', starts, rid .. '.released')
sweep_grants()  -- a returned part whose grant expired meanwhile expires now, with its own event
local _, bal, res = usable_now()
local payload = {id = rid, used = used, released = released, balance = bal,
                 available = bal - res}
idem_store(K_IDEM, fp, payload, idem_ttl_ms)
return reply(OK, payload)
