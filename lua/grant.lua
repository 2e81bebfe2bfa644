--[[ Apply a grant that the Postgres ledger already holds (push from the outbox).
  Idempotent by grant id: a grant is applied once, whatever the number of pushes.
  KEYS[1..11]  the organization's fixed keys (see lib.lua)
  ARGV[1] organization id        ARGV[2] now (ms)            ARGV[3] call id
  ARGV[4] grant id               ARGV[5] amount (millicredits, >= 1)
  ARGV[6] priority (0..899, lower is spent first)            ARGV[7] expires (ms; 0 = never)
  A grant that lands appends a `grant_applied` entry to the usage stream: the ledger
  holds the grant already, so settlement records nothing for it, but the organizations
  of every settled batch are the ones whose alerts and reconciliation are looked at
  (settler/service.py): this is how a grant reaches them.
  Returns {status, msgpack payload}:
    OK         {balance, available}
    DUPLICATE  {balance, available}   already applied, nothing changed
    NOT_LOADED                        the organization is not cached; the next load
                                      reads this grant from the ledger
]]
local gid, amount = ARGV[4], tonumber(ARGV[5])
local priority, expires_ms = tonumber(ARGV[6]), tonumber(ARGV[7])
if expires_ms <= 0 then expires_ms = SCORE_SCALE - 1 end

if not loaded() then return reply(NOT_LOADED, {}) end
local code = OK
if redis.call('SADD', KEYS[K_GAPPLIED], gid) == 1 then
  return_to_grant(gid, amount, priority * SCORE_SCALE + expires_ms)
  redis.call('HINCRBY', KEYS[K_ACCT], 'bal', amount)
  emit({t = 'grant_applied', id = next_event_id(), g = gid, amt = amount, at = NOW})
else
  code = DUPLICATE
end
local _, expired = scan_grants()
expire_grants(expired)
local v = redis.call('HMGET', KEYS[K_ACCT], 'bal', 'res')
return reply(code, {balance = num(v[1]), available = num(v[1]) - num(v[2])})
