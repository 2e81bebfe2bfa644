--[[ Take credits away outside of usage: an admin adjustment down, a refund clawback.
  Spends grants in burn-down order, never below zero: up to the available amount when
  ARGV[6] = '1' (clawback of what is unspent), else all or nothing. The stream entry
  is how the ledger learns of it (like usage), so the debit is recorded exactly once.
  KEYS[1..12]  the organization's fixed keys (see lib.lua)
  KEYS[13]     idempotency record (required)
  KEYS[14]     (optional) the same record's name before (see idem_twin in lib.lua)
  ARGV[1] organization id        ARGV[2] now (ms)            ARGV[3] call id
  ARGV[4] idempotency fingerprint                            ARGV[5] amount (millicredits)
  ARGV[6] '1' = take what is available, '0' = all or nothing
  ARGV[7] kind (adjustment | refund)                         ARGV[8] reason
  ARGV[9] idempotency ttl (ms)   ARGV[10] event id
  ARGV[11] grant id ('' = any, in burn-down order): take only from this grant (a void)
  ARGV[12..14] current day / week / month start (ms): expired holds close first
  Returns {status, msgpack payload}:
    OK      {id, debited, balance, available}
    REPLAY | NOT_LOADED | IDEMPOTENCY_CONFLICT
    INSUFFICIENT_CREDITS {available, needed} | NOT_FOUND (no such live grant)
]]
local fp, amount, partial = ARGV[4], tonumber(ARGV[5]), ARGV[6] == '1'
local kind, reason, idem_ttl_ms, event_id = ARGV[7], ARGV[8], tonumber(ARGV[9]), ARGV[10]
local only_grant = ARGV[11] or ''
local starts = {day = tonumber(ARGV[12]), week = tonumber(ARGV[13]), month = tonumber(ARGV[14])}

if not loaded() then return reply(NOT_LOADED, {}) end
idem_twin_after(K_IDEM)  -- the record's name before, when passed
local replay = idem_check(K_IDEM, fp)
if replay then return replay end

sweep_holds(starts)  -- what expired holds kept back is available again
sweep_grants()
local usable, bal, res = usable_now()
local grants = grants_cursor()
if only_grant ~= '' then  -- one grant: what it has left is what can go
  local rem = tonumber(redis.call('HGET', KEYS[K_GREM], only_grant))
  local score = tonumber(redis.call('ZSCORE', KEYS[K_GQ], only_grant))
  if not rem or not score then return reply(NOT_FOUND, {}) end
  grants.items = {{only_grant, rem, score}}
  grants.avail, grants.exhausted = rem, true
  -- What it has left, but never more than is available: with debt owed beside it (a
  -- grant that reached the cache without repaying), voiding all of it would go below zero.
  usable = math.min(rem, usable)
end
local debit = amount
if not may_charge(debit, usable, true) then  -- never on the credit line
  if not partial then
    return reply(INSUFFICIENT_CREDITS, {available = usable, needed = amount})
  end
  debit = math.max(0, usable)
end
local alloc = take(grants, debit)
if not alloc then return reply(INSUFFICIENT_CREDITS, {available = grants.avail, needed = amount}) end
flush_grants(grants)
if debit > 0 then bal = redis.call('HINCRBY', KEYS[K_ACCT], 'bal', 0 - debit) end
emit({t = kind, id = event_id, amt = debit, asked = amount, why = reason, g = alloc, at = NOW})
local payload = {id = event_id, debited = debit, balance = bal, available = bal - res}
idem_store(K_IDEM, fp, payload, idem_ttl_ms)
return reply(OK, payload)
