--[[ Group commit: the consumes of one organization that arrived while its previous
  call was in flight, decided one after the other in arrival order, in one call. Each
  request keeps its own answer: exactly what consume.lua would have answered it, had the
  requests been sent one by one in this order (its own idempotency record, its own
  credential's revocation, rate limit and cap, its own refusal, which charges nothing
  and does not stop the others).
  KEYS[1..12]  the organization's fixed keys (see lib.lua)
  KEYS[13..]   idempotency records, referred to by a request's ki
  ARGV[1] organization id        ARGV[2] now (ms)            ARGV[3] call id
  ARGV[4] (unused: each request names its credential)        ARGV[5] default rate
  ARGV[6] default burst          ARGV[7..9] current day / week / month start (ms)
  ARGV[10] (unused)              ARGV[11] idempotency ttl (ms) of a client's key
  ARGV[12] idempotency ttl (ms) of a key the sidecar assigned
  ARGV[13] the requests in arrival order, msgpack list of
           {credential, action, units, department ('' none), metadata (JSON text),
            event id, ki (KEYS index of its idempotency record, 0 none), fingerprint,
            assigned (1: the sidecar's key), KEYS index of the record's name before (0 none)}
  Returns {OK, status 1, payload 1, status 2, payload 2, ...}: per request, consume.lua's
  status and msgpack payload (a REPLAY's payload is the stored first answer); a charge's
  answer (OK, or the REPLAY of a charge of this group) comes as its idempotency record
  keeps it, the list {id, credits, balance[, available]} (see charge_body). Or
  {NOT_LOADED, ''} for the whole group (nothing decided: load, then call again).
  The charges append one `use_batch` stream entry per credential.
]]
local _, default_rate, default_burst, starts = charging_args(ARGV)
local ttl_client, ttl_assigned = tonumber(ARGV[11]), tonumber(ARGV[12])
local requests = unpack(ARGV[13])

if not loaded() then return {NOT_LOADED, ''} end
-- What a consume does first, done once for the group: expired holds and grants leave.
sweep_holds(starts)
sweep_grants()
local usable, bal, res = usable_now()
local grants = grants_cursor()

local creds, cred_order = {}, {}   -- credential -> state (read once, written once)
local costs, depts = {}, {}
local fresh = {}                   -- ki -> {fp, packed answer}: records written by this call
local events = {}                  -- credential -> its charged events
local total = 0
local out = {OK}

local function answer(code, packed)
  out[#out + 1] = code
  out[#out + 1] = packed
end

for _, q in ipairs(requests) do
  local cred, action, units, dept, metadata = q[1], q[2], q[3], q[4], q[5]
  local event_id, ki, fp, assigned = q[6], q[7], q[8], q[9]
  idem_twin(ki, q[10])
  local done = false
  -- Its idempotency record: written by an earlier request of this group, or before.
  if ki > 0 then
    local f = fresh[ki]
    if f then
      if idem_same(f[1], fp) then answer(REPLAY, f[2]) else answer(IDEMPOTENCY_CONFLICT, pack({})) end
      done = true
    elseif assigned ~= 1 then  -- (a key the sidecar assigned was drawn for this request: nothing to find)
      local early = idem_check(ki, fp)
      if early then answer(early[1], early[2]); done = true end
    end
  end
  local c = nil
  if not done then
    c = creds[cred]
    if not c then
      c = cred_state(cred)
      creds[cred] = c
      cred_order[#cred_order + 1] = cred
    end
    if c.revoked then
      answer(UNAUTHENTICATED, pack({}))
      done = true
    else
      local wait_ms = rate_take(cred, default_rate, default_burst, c, true)
      if wait_ms > 0 then answer(RATE_LIMITED, pack({retry_after_ms = wait_ms})); done = true end
    end
  end
  if not done then
    local cost = costs[action]
    if cost == nil then
      cost = tonumber(redis.call('HGET', KEYS[K_COSTS], action)) or false
      costs[action] = cost
    end
    local d = nil
    if not cost then
      answer(UNKNOWN_ACTION, pack({}))
      done = true
    elseif dept ~= '' then
      d = depts[dept]
      if d == nil then
        d = dept_state(dept, starts) or false
        depts[dept] = d
      end
      if not d then answer(DEPARTMENT_NOT_FOUND, pack({})); done = true end
    end
    if not done then
      local charge = cost * units
      if not may_charge(charge, usable) then
        answer(INSUFFICIENT_CREDITS, pack({available = usable, needed = charge}))
      elseif d and d.limit >= 0 and d.spent + charge > d.limit then
        answer(DEPARTMENT_LIMIT, pack({remaining = dept_room(d), needed = charge}))
      elseif c.cap >= 0 and c.spent + charge > c.cap then
        answer(CAP_EXCEEDED, pack({remaining = cred_room(c), needed = charge}))
      else
        local alloc, od = take_charge(grants, charge)
        if not alloc then
          answer(INSUFFICIENT_CREDITS, pack({available = grants.avail, needed = charge}))
        else
          usable = usable - charge
          bal = bal - charge
          total = total + charge
          if charge > 0 then
            c.spent = c.spent + charge
            c.spent_dirty = true
          end
          if d then
            d.spent = d.spent + charge
            d.dirty = true
          end
          local mine = events[cred]
          if not mine then
            mine = {}
            events[cred] = mine
          end
          mine[#mine + 1] = {id = event_id, act = action, u = units, amt = charge, d = dept, m = metadata, g = alloc,
                             od = od > 0 and od or nil}
          local body = charge_body(event_id, charge, bal, bal - res)  -- the answer, as its record keeps it
          if ki > 0 then
            idem_store_body(ki, fp, body, assigned == 1 and ttl_assigned or ttl_client)
            fresh[ki] = {string.sub(fp, 1, IDEM_FP), body}
          end
          answer(OK, body)
        end
      end
    end
  end
end

-- Every request decided: write once.
flush_grants(grants)
for dept, d in pairs(depts) do
  if d and d.dirty then dept_write(dept, d) end
end
for n, cred in ipairs(cred_order) do
  local c = creds[cred]
  if c.spent_dirty then redis.call('HSET', KEYS[K_CREDS], cred .. '|spent', c.spent) end
  rate_write(cred, c)
  local mine = events[cred]
  if mine then
    emit({t = 'use_batch', id = CALL_ID .. '-' .. n, k = cred, at = NOW, ev = mine})
  end
end
if total > 0 then redis.call('HINCRBY', KEYS[K_ACCT], 'bal', 0 - total) end
return out
