--[[ Consume credits for many actions in one atomic step.
  KEYS[1..11]  the organization's fixed keys (see lib.lua)
  KEYS[12]     request idempotency record (used only when ARGV[10] is not empty)
  KEYS[13..]   item idempotency records, referred to by items[i].ki
  ARGV[1] organization id        ARGV[2] now (ms)            ARGV[3] call id
  ARGV[4] credential id          ARGV[5] default rate        ARGV[6] default burst
  ARGV[7..9] current day / week / month start (ms)
  ARGV[10] request idempotency fingerprint ('' = none)       ARGV[11] idempotency ttl (ms)
  ARGV[12] atomic ('1' = all or none, '0' = best effort)
  ARGV[13] items, msgpack list of {a = action, u = units, d = department ('' none),
           m = metadata (JSON text, '' none), id = event id, ki = KEYS index of the item's
           idempotency record (0 none), fp = item fingerprint}
  Returns {status, msgpack payload}:
    OK      {results = [{i, ok, id?, credits?, err?, need?, have?}], balance, available}
            (best effort: each item succeeds or fails on its own; a failed item costs
            nothing; an item whose key was used before returns its first result)
    ITEM_FAILED {index, err, ...}  atomic mode only: nothing was charged
    REPLAY | NOT_LOADED | IDEMPOTENCY_CONFLICT | UNAUTHENTICATED | RATE_LIMITED
  Item error codes (err): UNKNOWN_ACTION, DEPARTMENT_NOT_FOUND, INSUFFICIENT_CREDITS,
  DEPARTMENT_LIMIT, CAP_EXCEEDED, IDEMPOTENCY_CONFLICT.
  The whole batch appends ONE stream entry carrying every charged event.
]]
local cred = ARGV[4]
local default_rate, default_burst = tonumber(ARGV[5]), tonumber(ARGV[6])
local starts = {day = tonumber(ARGV[7]), week = tonumber(ARGV[8]), month = tonumber(ARGV[9])}
local fp, idem_ttl_ms = ARGV[10], tonumber(ARGV[11])
local atomic = ARGV[12] == '1'
local items = unpack(ARGV[13])

if not loaded() then return reply(NOT_LOADED, {}) end
local replay = idem_check(12, fp)
if replay then return replay end

local c = cred_state(cred)
if c.revoked then return reply(UNAUTHENTICATED, {}) end
local wait_ms = rate_take(cred, default_rate, default_burst)
if wait_ms > 0 then return reply(RATE_LIMITED, {retry_after_ms = wait_ms}) end

sweep_holds(starts)
local live, expired, usable = scan_grants()
expire_grants(expired)

local costs = {}
local depts = {}
local results = {}
local events = {}
local stores = {}
local total = 0

for i, it in ipairs(items) do
  local r = {i = i - 1}
  local replayed = nil
  if it.ki > 0 then
    local stored = redis.call('GET', KEYS[it.ki])
    if stored then
      local sep = string.find(stored, '\n', 1, true)
      if string.sub(stored, 1, sep - 1) ~= it.fp then
        r.err = IDEMPOTENCY_CONFLICT
      else
        replayed = unpack(string.sub(stored, sep + 1))
      end
    end
  end
  if replayed then
    r.ok = true
    r.id = replayed.id
    r.credits = replayed.credits
    r.replay = true
  elseif not r.err then
    local cost = costs[it.a]
    if cost == nil then
      cost = tonumber(redis.call('HGET', KEYS[K_COSTS], it.a)) or false
      costs[it.a] = cost
    end
    local d = nil
    if not cost then
      r.err = UNKNOWN_ACTION
    else
      local charge = cost * it.u
      if it.d ~= '' then
        d = depts[it.d]
        if d == nil then
          d = dept_state(it.d, starts) or false
          depts[it.d] = d
        end
        if not d then r.err = DEPARTMENT_NOT_FOUND end
      end
      if not r.err then
        if charge > usable then
          r.err, r.need, r.have = INSUFFICIENT_CREDITS, charge, usable
        elseif d and d.limit >= 0 and d.spent + charge > d.limit then
          r.err, r.need, r.have = DEPARTMENT_LIMIT, charge, dept_room(d)
        elseif c.cap >= 0 and c.spent + charge > c.cap then
          r.err, r.need, r.have = CAP_EXCEEDED, charge, cred_room(c)
        end
      end
      if not r.err then
        usable = usable - charge
        total = total + charge
        c.spent = c.spent + charge
        if d then
          d.spent = d.spent + charge
          d.dirty = true
        end
        local alloc = take(live, charge)
        events[#events + 1] = {id = it.id, act = it.a, u = it.u, amt = charge, d = it.d,
                               m = it.m, g = alloc}
        r.ok = true
        r.id = it.id
        r.credits = charge
        if it.ki > 0 then stores[#stores + 1] = {it.ki, it.fp, {id = it.id, credits = charge}} end
      end
    end
  end
  if r.err then
    r.ok = false
    if atomic then
      return reply(ITEM_FAILED, r)
    end
  end
  results[#results + 1] = r
end

-- Every item decided: write once.
flush_grants(live)
for dept, d in pairs(depts) do
  if d and d.dirty then dept_write(dept, d) end
end
if total > 0 then
  redis.call('HSET', KEYS[K_CREDS], cred .. '|spent', c.spent)
end
local bal = redis.call('HINCRBY', KEYS[K_ACCT], 'bal', 0 - total)
local res = num(redis.call('HGET', KEYS[K_ACCT], 'res'))
if #events > 0 then
  emit({t = 'use_batch', id = CALL_ID, k = cred, at = NOW, ev = events})
end
for _, s in ipairs(stores) do
  redis.call('SET', KEYS[s[1]], s[2] .. '\n' .. pack(s[3]), 'PX', idem_ttl_ms)
end
local payload = {results = results, balance = bal, available = bal - res}
idem_store(12, fp, payload, idem_ttl_ms)
return reply(OK, payload)
