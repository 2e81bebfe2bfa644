--[[ Shared helpers, prepended to every script by lua/__init__.py (after the status
  codes, which are generated from lua.Status so there is one mapping).

  Every script gets the same fixed organization keys first (all share one hash tag):
    KEYS[1]  acct      hash   bal (millicredits, grants remaining + holds), res (held), loaded, gen
    KEYS[2]  grem      hash   grant id -> remaining millicredits (grants not yet spent)
    KEYS[3]  gq        zset   grant id -> burn-down score = priority * 1e13 + expires_ms
    KEYS[4]  costs     hash   action -> millicredits per unit
    KEYS[5]  depts     hash   "<dept>|limit" (-1 none), "|period" (day|week|month), "|pstart", "|spent"
    KEYS[6]  creds     hash   "<cred>|cap" (-1 none), "|spent", "|revoked", "|rate", "|burst", "|tok", "|ts"
    KEYS[7]  holds     hash   reservation id -> msgpack {a, al, d, ps, k, x, st, u}
    KEYS[8]  hx        zset   open reservation id -> expires_ms
    KEYS[9]  hclosed   zset   closed reservation id -> closed_ms (purged after HOLD_KEEP_MS)
    KEYS[10] gapplied  set    grant ids already applied (a grant push is idempotent)
    KEYS[11] stream    stream the organization's usage partition (never trimmed here)
  and the same leading ARGV:
    ARGV[1] organization id   ARGV[2] now (ms since epoch)   ARGV[3] call id (unique per call)

  Scripts return {status, msgpack payload}. No script reads the server clock.

  The same text runs two ways (lua/__init__.py): as one EVAL script per operation, or
  as a Redis function library where every operation is a function and these helpers
  are loaded once, not on every call. Either way an operation starts with
  begin(KEYS, ARGV), which binds the per-call state below; Redis runs one call at a
  time, so no two calls ever share it.
]]
-- cmsgpack is bound in begin(): a function library may not read it while loading.
local pack, unpack

local K_ACCT, K_GREM, K_GQ, K_COSTS, K_DEPTS, K_CREDS = 1, 2, 3, 4, 5, 6
local K_HOLDS, K_HX, K_HCLOSED, K_GAPPLIED, K_STREAM = 7, 8, 9, 10, 11
local N_FIXED = 11

local SCORE_SCALE = 10000000000000 -- 1e13 ms, past year 2286
local HOLD_SWEEP_MAX = 50          -- expired holds closed per call, bounded
local HOLD_KEEP_MS = 7 * 86400000  -- a closed hold answers reservation_closed this long
local HOLD_PURGE_MAX = 20

local ORG, NOW, CALL_ID
local event_seq = 0

local function begin(keys, argv)
  pack, unpack = cmsgpack.pack, cmsgpack.unpack
  KEYS, ARGV = keys, argv
  ORG, NOW, CALL_ID = argv[1], tonumber(argv[2]), argv[3]
  event_seq = 0
end

local function num(x)
  return tonumber(x) or 0
end

local function reply(code, payload)
  return {code, pack(payload)}
end

local function loaded()
  return redis.call('HGET', KEYS[K_ACCT], 'loaded') == '1'
end

-- Next event id of this call: deterministic from the call id, unique per call.
local function next_event_id()
  event_seq = event_seq + 1
  return CALL_ID .. '.' .. event_seq
end

local function emit(event)
  redis.call('XADD', KEYS[K_STREAM], '*', 'o', ORG, 'd', pack(event))
end

-- Idempotency record: "<fingerprint>\n<msgpack payload>". Returns nil when the key is
-- fresh, otherwise the reply to give (a replay of the first result, or a conflict).
local function idem_check(key_index, fp)
  if fp == '' then return nil end
  local stored = redis.call('GET', KEYS[key_index])
  if not stored then return nil end
  local sep = string.find(stored, '\n', 1, true)
  if string.sub(stored, 1, sep - 1) ~= fp then
    return {IDEMPOTENCY_CONFLICT, pack({})}
  end
  return {REPLAY, string.sub(stored, sep + 1)}
end

local function idem_store(key_index, fp, payload, ttl_ms)
  if fp == '' then return end
  redis.call('SET', KEYS[key_index], fp .. '\n' .. pack(payload), 'PX', ttl_ms)
end

-- Grants in burn-down order (priority, then soonest expiry). Returns the live grants
-- as a list of {id, remaining, score}, the expired ones, and the spendable total.
-- Two reads whatever the number of grants (grem holds exactly the queued grants).
local function scan_grants()
  local rows = redis.call('ZRANGE', KEYS[K_GQ], 0, -1, 'WITHSCORES')
  local live, expired, usable = {}, {}, 0
  if #rows == 0 then return live, expired, usable end
  local remaining = {}
  local flat = redis.call('HGETALL', KEYS[K_GREM])
  for i = 1, #flat, 2 do remaining[flat[i]] = flat[i + 1] end
  for i = 1, #rows, 2 do
    local gid = rows[i]
    local score = tonumber(rows[i + 1])
    local rem = num(remaining[gid])
    if score % SCORE_SCALE <= NOW then
      expired[#expired + 1] = {gid, rem, score}
    else
      live[#live + 1] = {gid, rem, score}
      usable = usable + rem
    end
  end
  return live, expired, usable
end

-- Take `amount` from the live grants in order (in memory); returns the allocation as a
-- flat list {gid, amount, score, ...}. The caller checked that enough is usable.
local function take(live, amount)
  local first = live[1]
  if amount > 0 and first and first[2] >= amount then  -- the usual case: one grant covers it
    first[2] = first[2] - amount
    first.dirty = true
    return {first[1], amount, first[3]}
  end
  local alloc = {}
  for _, g in ipairs(live) do
    if amount <= 0 then break end
    local t = math.min(g[2], amount)
    if t > 0 then
      g[2] = g[2] - t
      g.dirty = true
      amount = amount - t
      alloc[#alloc + 1] = g[1]
      alloc[#alloc + 1] = t
      alloc[#alloc + 1] = g[3]
    end
  end
  return alloc
end

-- Write back the grants `take` changed; a grant spent to zero leaves the queue.
local function flush_grants(live)
  for _, g in ipairs(live) do
    if g.dirty then
      g.dirty = false
      if g[2] <= 0 then
        redis.call('HDEL', KEYS[K_GREM], g[1])
        redis.call('ZREM', KEYS[K_GQ], g[1])
      else
        redis.call('HSET', KEYS[K_GREM], g[1], g[2])
      end
    end
  end
end

-- Expired grants leave the balance with an `expiration` event. Never spent.
local function expire_grants(expired)
  local total = 0
  for _, g in ipairs(expired) do
    redis.call('HDEL', KEYS[K_GREM], g[1])
    redis.call('ZREM', KEYS[K_GQ], g[1])
    if g[2] > 0 then
      total = total + g[2]
      emit({t = 'grant_expired', id = next_event_id(), g = g[1], amt = g[2], at = NOW})
    end
  end
  if total > 0 then redis.call('HINCRBY', KEYS[K_ACCT], 'bal', 0 - total) end
  return total
end

local function return_to_grant(gid, amount, score)
  redis.call('HINCRBY', KEYS[K_GREM], gid, amount)
  redis.call('ZADD', KEYS[K_GQ], score, gid)
end

-- Department state for the current period. starts maps period -> current period start
-- (ms). A stored period start older than the current one means the period rolled
-- over: spent counts from zero (written on the next successful charge).
local function dept_state(dept, starts)
  local v = redis.call('HMGET', KEYS[K_DEPTS], dept .. '|limit', dept .. '|period',
    dept .. '|pstart', dept .. '|spent')
  if not v[2] then return nil end
  local cur = starts[v[2]]
  local spent = num(v[4])
  if num(v[3]) < cur then spent = 0 end
  local limit = tonumber(v[1]) or -1
  return {limit = limit, period = v[2], pstart = cur, spent = spent}
end

local function dept_room(d)
  if d.limit < 0 then return -1 end
  return math.max(0, d.limit - d.spent)
end

local function dept_write(dept, d)
  redis.call('HSET', KEYS[K_DEPTS], dept .. '|pstart', d.pstart, dept .. '|spent', d.spent)
end

-- Credential state in one read: cap (-1 none) and spent, revoked flag, and the raw
-- token bucket fields for rate_take.
local function cred_state(cred)
  local v = redis.call('HMGET', KEYS[K_CREDS], cred .. '|cap', cred .. '|spent', cred .. '|revoked',
    cred .. '|rate', cred .. '|burst', cred .. '|tok', cred .. '|ts')
  return {cap = tonumber(v[1]) or -1, spent = num(v[2]), revoked = v[3] == '1',
          rate = v[4], burst = v[5], tok = v[6], ts = v[7]}
end

local function cred_room(c)
  if c.cap < 0 then return -1 end
  return math.max(0, c.cap - c.spent)
end

-- Token bucket per credential. Returns 0 when a token was taken, otherwise the
-- milliseconds to wait. rate (tokens/s) <= 0 means unlimited. c: cred_state(cred),
-- read in this call.
local function rate_take(cred, default_rate, default_burst, c)
  local rate = tonumber(c.rate) or default_rate
  local burst = tonumber(c.burst) or default_burst
  if rate <= 0 then return 0 end
  local tok = tonumber(c.tok) or burst
  local ts = tonumber(c.ts) or NOW
  if NOW > ts then tok = math.min(burst, tok + (NOW - ts) * rate / 1000) end
  if tok < 1 then
    return math.max(1, math.ceil((1 - tok) * 1000 / rate))
  end
  redis.call('HSET', KEYS[K_CREDS], cred .. '|tok', tok - 1, cred .. '|ts', math.max(NOW, ts))
  return 0
end

-- Close one reservation: charge `used` from its allocation in order, return the rest
-- to the grants it came from (a grant that has expired meanwhile expires again on the
-- next scan, with its own event), give back department and credential room.
local function close_hold(rid, h, used, how, starts, event_id)
  local to_charge = used
  local charged = {}
  for i = 1, #h.al, 3 do
    local gid, amt, score = h.al[i], h.al[i + 1], h.al[i + 2]
    local c = math.min(amt, to_charge)
    to_charge = to_charge - c
    if c > 0 then
      charged[#charged + 1] = gid
      charged[#charged + 1] = c
    end
    if amt - c > 0 then return_to_grant(gid, amt - c, score) end
  end
  local released = h.a - used
  if h.d ~= '' and released > 0 then
    local d = dept_state(h.d, starts)
    if d and d.pstart == h.ps then
      d.spent = math.max(0, d.spent - released)
      dept_write(h.d, d)
    end
  end
  if h.k ~= '' and released > 0 then
    local c = cred_state(h.k)
    redis.call('HSET', KEYS[K_CREDS], h.k .. '|spent', math.max(0, c.spent - released))
  end
  redis.call('HINCRBY', KEYS[K_ACCT], 'bal', 0 - used)
  redis.call('HINCRBY', KEYS[K_ACCT], 'res', 0 - h.a)
  h.st = how
  h.u = used
  h.c = NOW
  redis.call('HSET', KEYS[K_HOLDS], rid, pack(h))
  redis.call('ZREM', KEYS[K_HX], rid)
  redis.call('ZADD', KEYS[K_HCLOSED], NOW, rid)
  emit({t = 'hold_closed', id = event_id, r = rid, how = how, used = used, rel = released,
        g = charged, d = h.d, k = h.k, act = h.act, at = NOW})
  return released
end

-- Expired holds return to available before anything else is decided. Returns how
-- many were closed (each changed the account's bal and res).
local function sweep_holds(starts)
  local ids = redis.call('ZRANGEBYSCORE', KEYS[K_HX], '-inf', NOW, 'LIMIT', 0, HOLD_SWEEP_MAX)
  local closed = 0
  for _, rid in ipairs(ids) do
    local raw = redis.call('HGET', KEYS[K_HOLDS], rid)
    if raw then
      close_hold(rid, unpack(raw), 0, 'expired', starts, rid .. '.expired')
      closed = closed + 1
    else
      redis.call('ZREM', KEYS[K_HX], rid)
    end
  end
  return closed
end

local function purge_closed_holds()
  local ids = redis.call('ZRANGEBYSCORE', KEYS[K_HCLOSED], '-inf', NOW - HOLD_KEEP_MS,
    'LIMIT', 0, HOLD_PURGE_MAX)
  for _, rid in ipairs(ids) do
    redis.call('HDEL', KEYS[K_HOLDS], rid)
    redis.call('ZREM', KEYS[K_HCLOSED], rid)
  end
end

local function totals(usable)
  local v = redis.call('HMGET', KEYS[K_ACCT], 'bal', 'res')
  return num(v[1]), num(v[2]), usable
end
