--[[ Read an organization's balance (expiring what is due first).
  KEYS[1..12]  the organization's fixed keys (see lib.lua)
  ARGV[1] organization id        ARGV[2] now (ms)            ARGV[3] call id
  ARGV[4] credential id          ARGV[5] default rate        ARGV[6] default burst
  ARGV[7..9] current day / week / month start (ms)           ARGV[10] department ('' none)
  Returns {status, msgpack payload}:
    OK {balance, reserved, available, credit_limit, debt, grants = [{id, remaining, expires_ms}],
        dept? = {limit, period, pstart, spent}}
    NOT_LOADED | UNAUTHENTICATED | RATE_LIMITED {retry_after_ms} | DEPARTMENT_NOT_FOUND
]]
local cred = ARGV[4]
local default_rate, default_burst = tonumber(ARGV[5]), tonumber(ARGV[6])
local starts = {day = tonumber(ARGV[7]), week = tonumber(ARGV[8]), month = tonumber(ARGV[9])}
local dept = ARGV[10]

if not loaded() then return reply(NOT_LOADED, {}) end
if cred ~= '' then
  local c = cred_state(cred)
  if c.revoked then return reply(UNAUTHENTICATED, {}) end
  local wait_ms = rate_take(cred, default_rate, default_burst, c)
  if wait_ms > 0 then return reply(RATE_LIMITED, {retry_after_ms = wait_ms}) end
end
-- Expired holds first: their spend leaves the department before it is read.
sweep_holds(starts)
local d = nil
if dept ~= '' then
  d = dept_state(dept, starts)
  if not d then return reply(DEPARTMENT_NOT_FOUND, {}) end
end
sweep_grants()
-- Every live grant (a listing, not the charge path): in burn-down order.
local rows = redis.call('ZRANGE', KEYS[K_GQ], 0, -1, 'WITHSCORES')
local left = {}
local flat = redis.call('HGETALL', KEYS[K_GREM])
for i = 1, #flat, 2 do left[flat[i]] = flat[i + 1] end
local grants = {}
for i = 1, #rows, 2 do
  local exp = tonumber(rows[i + 1]) % SCORE_SCALE
  if exp >= NEVER then exp = 0 end
  grants[#grants + 1] = {id = rows[i], remaining = num(left[rows[i]]), expires_ms = exp}
end
local _, bal, res = usable_now()
local v = redis.call('HMGET', KEYS[K_ACCT], 'lim', 'debt')
local payload = {balance = bal, reserved = res, available = bal - res, credit_limit = num(v[1]),
                 debt = num(v[2]), grants = grants}
if d then payload.dept = d end
return reply(OK, payload)
