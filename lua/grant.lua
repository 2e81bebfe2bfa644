--[[ Apply a grant that the Postgres ledger already holds (push from the outbox).
  Idempotent by grant id: a grant is applied once, whatever the number of pushes. The
  cache remembers applied grants for APPLIED_KEEP_MS (a cold load marks the recent ones
  and those in the outbox); a push of an older grant it does not remember cannot be
  told from a repeat, so it is refused as STALE and the pusher reloads the
  organization from the ledger instead (accounts/grants.py), which is always right.
  A grant that lands appends a `grant_applied` entry to the usage stream: the ledger
  holds the grant already, so settlement records nothing for it (but the debt it
  repaid first, `rp`: the cache decides it, as it decides every allocation, and
  settlement records it as a repayment in debt_entries), but the organizations
  of every settled batch are the ones whose alerts and reconciliation are looked at
  (settler/service.py): this is how a grant reaches them.
  KEYS[1..12]  the organization's fixed keys (see lib.lua)
  ARGV[1] organization id        ARGV[2] now (ms)            ARGV[3] call id
  ARGV[4] grant id               ARGV[5] amount (millicredits, >= 1)
  ARGV[6] priority (0..899, lower is spent first)            ARGV[7] expires (ms; 0 = never)
  ARGV[8] created (ms: when the ledger wrote the grant)
  Returns {status, msgpack payload}:
    OK         {balance, available}
    DUPLICATE  {balance, available}   already applied, nothing changed
    STALE      {}                     too old to tell: reload the organization
    NOT_LOADED                        the organization is not cached; the next load
                                      reads this grant from the ledger
]]
local gid, amount = ARGV[4], tonumber(ARGV[5])
local priority, expires_ms = tonumber(ARGV[6]), tonumber(ARGV[7])
local created_ms = tonumber(ARGV[8])
if expires_ms <= 0 then expires_ms = NEVER end

if not loaded() then return reply(NOT_LOADED, {}) end
redis.call('ZREMRANGEBYSCORE', KEYS[K_GAPPLIED], '-inf', '(' .. (NOW - APPLIED_KEEP_MS))
local code = OK
if redis.call('ZSCORE', KEYS[K_GAPPLIED], gid) then
  code = DUPLICATE
elseif created_ms < NOW - APPLIED_KEEP_MS then
  return reply(STALE, {})
else
  redis.call('ZADD', KEYS[K_GAPPLIED], NOW, gid)
  -- A debt on the credit line is repaid first, from this grant (rp: settled as a
  -- repayment); the rest of the grant is spendable. What open holds took on the line
  -- (hod) is not owed yet: their release gives back what they do not use.
  local line = redis.call('HMGET', KEYS[K_ACCT], 'debt', 'hod')
  local rp = math.min(amount, math.max(0, num(line[1]) - num(line[2])))
  if rp > 0 then redis.call('HINCRBY', KEYS[K_ACCT], 'debt', 0 - rp) end
  if amount - rp > 0 then return_to_grant(gid, amount - rp, priority * SCORE_SCALE + expires_ms) end
  redis.call('HINCRBY', KEYS[K_ACCT], 'bal', amount)
  emit({t = 'grant_applied', id = next_event_id(), g = gid, amt = amount, rp = rp > 0 and rp or nil, at = NOW})
end
sweep_grants()
local _, bal, res = usable_now()
return reply(code, {balance = bal, available = bal - res})
