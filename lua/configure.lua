--[[ Mirror a configuration change that Postgres already holds into the cache.
  KEYS[1..12]  the organization's fixed keys (see lib.lua)
  ARGV[1] organization id        ARGV[2] now (ms)            ARGV[3] call id
  ARGV[4] what: 'cost' | 'dept' | 'cred' | 'line'
    cost: ARGV[5] action         ARGV[6] millicredits per unit
    dept: ARGV[5] department id  ARGV[6] limit (millicredits, -1 none)
          ARGV[7] period (day | week | month); a new period starts counting afresh
    cred: ARGV[5] credential id  ARGV[6] cap (millicredits, -1 none)
          ARGV[7] revoked ('1' | '0')  ARGV[8] rate (requests/s, '' default)
          ARGV[9] burst ('' default)
    line: ARGV[5] credit limit (millicredits >= 0): how far below zero available may go;
          a lower limit refuses new charges past it, and owes what is owed already
  Returns {status, msgpack payload}:
    OK {}        NOT_LOADED {}  (nothing to update; the next load reads Postgres)
]]
local what = ARGV[4]
if not loaded() then return reply(NOT_LOADED, {}) end
if what == 'cost' then
  redis.call('HSET', KEYS[K_COSTS], ARGV[5], tonumber(ARGV[6]))
elseif what == 'dept' then
  local dept, limit, period = ARGV[5], tonumber(ARGV[6]), ARGV[7]
  local old = redis.call('HGET', KEYS[K_DEPTS], dept .. '|period')
  redis.call('HSET', KEYS[K_DEPTS], dept .. '|limit', limit, dept .. '|period', period)
  if old ~= period then
    redis.call('HSET', KEYS[K_DEPTS], dept .. '|pstart', 0, dept .. '|spent', 0)
  end
elseif what == 'cred' then
  local cred = ARGV[5]
  redis.call('HSET', KEYS[K_CREDS], cred .. '|cap', tonumber(ARGV[6]),
    cred .. '|revoked', ARGV[7])
  if ARGV[8] ~= '' then redis.call('HSET', KEYS[K_CREDS], cred .. '|rate', tonumber(ARGV[8])) end
  if ARGV[9] ~= '' then redis.call('HSET', KEYS[K_CREDS], cred .. '|burst', tonumber(ARGV[9])) end
elseif what == 'line' then
  redis.call('HSET', KEYS[K_ACCT], 'lim', tonumber(ARGV[5]))
else
  return redis.error_reply('configure: unknown what ' .. what)
end
return reply(OK, {})
