--[[ Take credits away outside of usage: an admin adjustment down, a refund clawback.
  Spends grants in burn-down order, never below zero: up to the available amount when
  ARGV[6] = '1' (clawback of what is unspent), else all or nothing. The stream entry
  is how the ledger learns of it (like usage), so the debit is recorded exactly once.
  KEYS[1..11]  the organization's fixed keys (see lib.lua)
  KEYS[12]     idempotency record (required)
  ARGV[1] organization id        ARGV[2] now (ms)            ARGV[3] call id
  ARGV[4] idempotency fingerprint                            ARGV[5] amount (millicredits)
  ARGV[6] '1' = take what is available, '0' = all or nothing
  ARGV[7] kind (adjustment | refund)                         ARGV[8] reason
  ARGV[9] idempotency ttl (ms)   ARGV[10] event id
  Returns {status, msgpack payload}:
    OK      {id, debited, balance, available}
    REPLAY | NOT_LOADED | IDEMPOTENCY_CONFLICT
    INSUFFICIENT_CREDITS {available, needed}
]]
local fp, amount, partial = ARGV[4], tonumber(ARGV[5]), ARGV[6] == '1'
local kind, reason, idem_ttl_ms, event_id = ARGV[7], ARGV[8], tonumber(ARGV[9]), ARGV[10]

if not loaded() then return reply(NOT_LOADED, {}) end
local replay = idem_check(12, fp)
if replay then return replay end

local live, expired, usable = scan_grants()
expire_grants(expired)
local debit = amount
if debit > usable then
  if not partial then
    return reply(INSUFFICIENT_CREDITS, {available = usable, needed = amount})
  end
  debit = usable
end
local alloc = take(live, debit)
flush_grants(live)
local bal = redis.call('HINCRBY', KEYS[K_ACCT], 'bal', 0 - debit)
local res = num(redis.call('HGET', KEYS[K_ACCT], 'res'))
emit({t = kind, id = event_id, amt = debit, asked = amount, why = reason, g = alloc, at = NOW})
local payload = {id = event_id, debited = debit, balance = bal, available = bal - res}
idem_store(12, fp, payload, idem_ttl_ms)
return reply(OK, payload)
