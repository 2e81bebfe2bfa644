--[[ Consume credits for many actions in one atomic step.
  KEYS[1..12]  the organization's fixed keys (see lib.lua)
  KEYS[13]     request idempotency record (used only when ARGV[10] is not empty)
  KEYS[14..]   item idempotency records, referred to by an item's ki
  ARGV[1] organization id        ARGV[2] now (ms)            ARGV[3] call id
  ARGV[4] credential id          ARGV[5] default rate        ARGV[6] default burst
  ARGV[7..9] current day / week / month start (ms)
  ARGV[10] request idempotency fingerprint ('' = none)       ARGV[11] idempotency ttl (ms)
  ARGV[12] atomic ('1' = all or none, '0' = best effort)
  ARGV[14] KEYS index of the request record's name before (0 or absent: none)
  ARGV[13] the items in order, msgpack list of runs
           {count, action, units, department ('' none), metadata (JSON text, '' none),
            ki = KEYS index of the item's idempotency record (0 none), item fingerprint,
            KEYS index of the record's name before (0 none)}:
           `count` consecutive items alike (a run with ki > 0 is one item).
           Item i (from 0) has the event id <call id>-<i>.
  Returns {status, msgpack payload}:
    OK      {b = call id, c = {action = millicredits per unit, false when unknown},
             f = failed items [{i, err, need?, have?}], r = replayed items [{i, id, credits}],
             balance, available}
            Every other item succeeded: id b-i, credits c[action] * units. (Best effort:
            each item succeeds or fails on its own; a failed item costs nothing; an item
            whose key was used before returns its first result.)
    ITEM_FAILED {i, err, need?, have?}  atomic mode only: nothing was charged
    REPLAY | NOT_LOADED | IDEMPOTENCY_CONFLICT | UNAUTHENTICATED | RATE_LIMITED
  Item error codes (err): UNKNOWN_ACTION, DEPARTMENT_NOT_FOUND, INSUFFICIENT_CREDITS,
  DEPARTMENT_LIMIT, CAP_EXCEEDED, IDEMPOTENCY_CONFLICT.
  The whole batch appends ONE stream entry carrying every charged event. An item may
  take `available` down to minus the credit line (may_charge; its od is the debt).
]]
local cred, default_rate, default_burst, starts, fp, idem_ttl_ms = charging_args(ARGV)
local atomic = ARGV[12] == '1'
local runs = unpack(ARGV[13])
idem_twin(K_IDEM, tonumber(ARGV[14] or 0))  -- the request record's name before

local early, c = preamble(cred, default_rate, default_burst, starts, fp)
if early then return early end
sweep_grants()
local usable, bal, res = usable_now()
local grants = grants_cursor()

local costs = {}
local depts = {}
local failed = {}
local replayed = {}
local events = {}
local stores = {}
local total = 0
local index = -1
local id_prefix = CALL_ID .. '-'

for _, run in ipairs(runs) do
  local count, a, u, d, m, ki, item_fp = run[1], run[2], run[3], run[4], run[5], run[6], run[7]
  idem_twin(ki, run[8])
  -- What every item of the run shares: its cost, its department, a stored first result.
  local err, stored = nil, nil
  if ki > 0 then
    local stored_fp, first = idem_read(ki)
    if stored_fp then
      if idem_same(stored_fp, item_fp) then stored = first else err = IDEMPOTENCY_CONFLICT end
    end
  end
  local cost = costs[a]
  if cost == nil then
    cost = tonumber(redis.call('HGET', KEYS[K_COSTS], a)) or false
    costs[a] = cost
  end
  local dstate = nil
  if not err and not stored then
    if not cost then
      err = UNKNOWN_ACTION
    elseif d ~= '' then
      dstate = depts[d]
      if dstate == nil then
        dstate = dept_state(d, starts) or false
        depts[d] = dstate
      end
      if not dstate then err = DEPARTMENT_NOT_FOUND end
    end
  end
  local charge = cost and cost * u or 0
  for _ = 1, count do
    index = index + 1
    local r = nil
    if stored then
      replayed[#replayed + 1] = {index, stored.id, stored.credits}
    elseif err then
      r = {i = index, err = err}
    elseif not may_charge(charge, usable) then
      r = {i = index, err = INSUFFICIENT_CREDITS, need = charge, have = usable}
    elseif dstate and dstate.limit >= 0 and dstate.spent + charge > dstate.limit then
      r = {i = index, err = DEPARTMENT_LIMIT, need = charge, have = dept_room(dstate)}
    elseif c.cap >= 0 and c.spent + charge > c.cap then
      r = {i = index, err = CAP_EXCEEDED, need = charge, have = cred_room(c)}
    else
      local alloc, od = take_charge(grants, charge)
      if alloc then
        usable = usable - charge
        total = total + charge
        c.spent = c.spent + charge
        if dstate then
          dstate.spent = dstate.spent + charge
          dstate.dirty = true
        end
        local event_id = id_prefix .. index
        events[#events + 1] = {id = event_id, act = a, u = u, amt = charge, d = d, m = m, g = alloc,
                                od = od > 0 and od or nil}
        -- Its record keeps the balance after it, as a /use's does: the key retried alone
        -- at /use replays a whole answer.
        if ki > 0 then stores[#stores + 1] = {ki, item_fp, event_id, charge, bal - total} end
      else  -- the grants hold less than bal - res says (see take): refused, not overdrawn
        r = {i = index, err = INSUFFICIENT_CREDITS, need = charge, have = grants.avail}
      end
    end
    if r then
      if atomic then return reply(ITEM_FAILED, r) end
      failed[#failed + 1] = r
    end
  end
end

-- Every item decided: write once.
flush_grants(grants)
for dept, dstate in pairs(depts) do
  if dstate and dstate.dirty then dept_write(dept, dstate) end
end
if total > 0 then
  redis.call('HSET', KEYS[K_CREDS], cred .. '|spent', c.spent)
  bal = redis.call('HINCRBY', KEYS[K_ACCT], 'bal', 0 - total)
end
if #events > 0 then
  emit({t = 'use_batch', id = CALL_ID, k = cred, at = NOW, ev = events})
end
for _, s in ipairs(stores) do
  idem_store_charge(s[1], s[2], s[3], s[4], s[5], s[5] - res, idem_ttl_ms)
end
local payload = {b = CALL_ID, c = costs, f = failed, r = replayed, balance = bal, available = bal - res}
idem_store(K_IDEM, fp, payload, idem_ttl_ms)
return reply(OK, payload)
