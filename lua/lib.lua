--[[ Shared helpers, prepended to every script by lua/__init__.py (after the status
  codes, which are generated from lua.Status so there is one mapping).

  Every script gets the same fixed organization keys first (all share one hash tag):
    KEYS[1]  acct      hash   bal (millicredits, grants remaining + holds - debt), res (held), loaded, gen,
                              lim (credit line: how far below zero available may go, 0 none),
                              debt (what charges past the grants owe; the next grants repay it),
                              hod (the part of debt that open holds took on the line: a grant
                              repays debt - hod, a hold's part is settled when it closes)
    KEYS[2]  grem      hash   grant id -> remaining millicredits (grants not yet spent)
    KEYS[3]  gq        zset   grant id -> burn-down score = priority * 1e13 + expires_ms
    KEYS[4]  gx        zset   grant id -> expires_ms, for the grants that expire
    KEYS[5]  costs     hash   action -> millicredits per unit
    KEYS[6]  depts     hash   "<dept>|limit" (-1 none), "|period" (day|week|month), "|pstart", "|spent"
    KEYS[7]  creds     hash   "<cred>|cap" (-1 none), "|spent", "|revoked", "|rate", "|burst", "|tok", "|ts"
    KEYS[8]  holds     hash   reservation id -> msgpack {a, al, d, ps, k, x, st, u, o?}
                              (o: the part of the hold on the credit line, debt)
    KEYS[9]  hx        zset   open reservation id -> expires_ms
    KEYS[10] hclosed   zset   closed reservation id -> closed_ms (purged after HOLD_KEEP_MS)
    KEYS[11] gapplied  zset   grant id -> applied_ms: a grant push is idempotent (pruned after APPLIED_KEEP_MS)
    KEYS[12] stream    stream the organization's usage partition (never trimmed here)
  then, for the scripts that take one, KEYS[13]: the call's idempotency record; and the
  same leading ARGV:
    ARGV[1] organization id   ARGV[2] now (ms since epoch)   ARGV[3] call id (unique per call)

  Invariant: bal - res == the sum of grem - debt (every credit not held is in exactly one
  grant; debt is what was charged past them on the credit line), so what is available is
  known without reading the grants; a charge reads only the grants it spends, in
  burn-down order, a few at a time (grants_cursor / take / take_charge).

  Scripts return {status, msgpack payload}. No script reads the server clock.

  The same text runs two ways (lua/__init__.py): as one EVAL script per operation, or
  as a Redis function library where every operation is a function and these helpers
  are loaded once, not on every call. Either way an operation starts with
  begin(KEYS, ARGV), which binds the per-call state below; Redis runs one call at a
  time, so no two calls ever share it.
]]
-- Lua's own unpack (a list into values); the name unpack is cmsgpack's below. Bound in
-- begin(), like cmsgpack: a function library may not read globals while it loads.
local unpack_list
local function bind_unpack_list() unpack_list = unpack end  -- `unpack` is still the global here
-- cmsgpack is bound in begin(): a function library may not read it while loading.
local pack, unpack

local K_ACCT, K_GREM, K_GQ, K_GX, K_COSTS, K_DEPTS, K_CREDS = 1, 2, 3, 4, 5, 6, 7
local K_HOLDS, K_HX, K_HCLOSED, K_GAPPLIED, K_STREAM = 8, 9, 10, 11, 12
local N_FIXED = 12
local K_IDEM = 13

-- The layout above, as `loaded` records it: a cache written by another layout (an
-- earlier version) reads as not loaded, and is loaded again from the ledger.
local CACHE_FORMAT = '2'

local SCORE_SCALE = 10000000000000 -- 1e13 ms, past year 2286
local NEVER = SCORE_SCALE - 1      -- the expiry of a grant that does not expire
local HOLD_SWEEP_MAX = 50          -- expired holds closed per call, bounded
local HOLD_KEEP_MS = 7 * 86400000  -- a closed hold answers reservation_closed this long
local HOLD_PURGE_MAX = 20
local GRANT_PAGE = 8               -- grants read at a time, in burn-down order
local GRANT_SWEEP_PAGE = 200       -- expired grants read at a time (all that are due expire)
local APPLIED_KEEP_MS = 7 * 86400000  -- how long an applied grant is remembered (ledger.store.APPLIED_KEEP_MS)

local ORG, NOW, CALL_ID
local event_seq = 0
local idem_twins = {}  -- KEYS index of a record -> KEYS index of its name before (see idem_twin)
-- The credit line as usable_now read it: the limit, and what the grants hold (the
-- part of a charge past that becomes debt, see take_charge).
local LINE_LIMIT, GRANTS_HOLD = 0, 0

local function begin(keys, argv)
  if not unpack_list then bind_unpack_list() end
  pack, unpack = cmsgpack.pack, cmsgpack.unpack
  KEYS, ARGV = keys, argv
  ORG, NOW, CALL_ID = argv[1], tonumber(argv[2]), argv[3]
  event_seq = 0
  idem_twins = {}
end

local function num(x)
  return tonumber(x) or 0
end

local function reply(code, payload)
  return {code, pack(payload)}
end

local function loaded()
  return redis.call('HGET', KEYS[K_ACCT], 'loaded') == CACHE_FORMAT
end

-- Next event id of this call: deterministic from the call id, unique per call.
local function next_event_id()
  event_seq = event_seq + 1
  return CALL_ID .. '.' .. event_seq
end

local function emit(event)
  redis.call('XADD', KEYS[K_STREAM], '*', 'o', ORG, 'd', pack(event))
end

-- Idempotency records, compact: one string key each, kept for the key's TTL, named
-- {prefix}:{crN}:i:<crc32 of the organization>:<digest of organization and key> (see
-- HotPath.idempotency_key; the name before, {prefix}:{crN}:o:<org>:idem:<digest>, was
-- twice as long). A record's value: a NUL,
-- the length of the fingerprint kept and its first IDEM_FP characters, then the first
-- answer in msgpack: a charge's answer {id, credits[, balance, available]} as the list
-- of its values (the names cost as much as the values), available left out when it
-- equals balance; any other answer as its map. Records of an earlier version
-- ("<fingerprint>\n<msgpack map>", never starting with a NUL) are read as well.
local IDEM_FP = 16

local function idem_value(fp, answer)
  local f = string.sub(fp, 1, IDEM_FP)
  return '\0' .. string.char(#f) .. f .. pack(answer)
end

-- While records written under the names before may still live (HotPath passes them
-- then), a record not found under its name is looked for under its name before: a
-- retry across the upgrade still replays. Records are only ever written under the new name.
local function idem_twin(key_index, twin_index)
  if twin_index and twin_index > 0 then idem_twins[key_index] = twin_index end
end

-- The same, for a record whose name before the caller passes right after it (a name
-- before always has ':idem:' in it: a key of another kind there is not one).
local function idem_twin_after(key_index)
  local twin = KEYS[key_index + 1]
  if twin and string.find(twin, ':idem:', 1, true) then idem_twins[key_index] = key_index + 1 end
end

-- The stored fingerprint and the answer (a table), or nil when the key is fresh.
local function idem_read(key_index)
  local stored = redis.call('GET', KEYS[key_index])
  if not stored and idem_twins[key_index] then stored = redis.call('GET', KEYS[idem_twins[key_index]]) end
  if not stored then return nil end
  if string.byte(stored, 1) ~= 0 then  -- an earlier version's
    local sep = string.find(stored, '\n', 1, true)
    return string.sub(stored, 1, sep - 1), unpack(string.sub(stored, sep + 1))
  end
  local n = string.byte(stored, 2)
  local v = unpack(string.sub(stored, 3 + n))
  if v[1] ~= nil then  -- a charge's answer, as a list
    v = {id = v[1], credits = v[2], balance = v[3], available = v[4] or v[3]}
  end
  return string.sub(stored, 3, 2 + n), v
end

local function idem_same(stored_fp, fp)
  return stored_fp == fp or stored_fp == string.sub(fp, 1, IDEM_FP)
end

-- nil when the key is fresh, otherwise the reply to give (a replay of the first
-- result, or a conflict).
local function idem_check(key_index, fp)
  if fp == '' then return nil end
  local stored_fp, first = idem_read(key_index)
  if not stored_fp then return nil end
  if not idem_same(stored_fp, fp) then
    return {IDEMPOTENCY_CONFLICT, pack({})}
  end
  return {REPLAY, pack(first)}
end

local function idem_store(key_index, fp, payload, ttl_ms)
  if fp == '' then return end
  redis.call('SET', KEYS[key_index], idem_value(fp, payload), 'PX', ttl_ms)
end

-- A charge's answer as a record stores it: {id, credits[, balance[, available]]}, packed
-- (balance nil: a batch item's, which has none; available left out when it is balance).
local function charge_body(id, credits, balance, available)
  if balance == nil then return pack({id, credits}) end
  if available == balance then return pack({id, credits, balance}) end
  return pack({id, credits, balance, available})
end

local function idem_store_body(key_index, fp, body, ttl_ms)
  if fp == '' then return end
  local f = string.sub(fp, 1, IDEM_FP)
  redis.call('SET', KEYS[key_index], '\0' .. string.char(#f) .. f .. body, 'PX', ttl_ms)
end

local function idem_store_charge(key_index, fp, id, credits, balance, available, ttl_ms)
  if fp == '' then return end
  idem_store_body(key_index, fp, charge_body(id, credits, balance, available), ttl_ms)
end

-- Every grant whose expiry has come leaves the balance, with an `expiration` event
-- for what it had left; never spent. All that are due, a page at a time: each grant
-- expires once, so the work is the grants' own, not the call's.
local function sweep_grants()
  local total = 0
  while true do
    local due = redis.call('ZRANGEBYSCORE', KEYS[K_GX], '-inf', NOW, 'LIMIT', 0, GRANT_SWEEP_PAGE)
    if #due == 0 then break end
    local left = redis.call('HMGET', KEYS[K_GREM], unpack_list(due))
    for i, gid in ipairs(due) do
      local rem = num(left[i])
      redis.call('HDEL', KEYS[K_GREM], gid)
      redis.call('ZREM', KEYS[K_GQ], gid)
      redis.call('ZREM', KEYS[K_GX], gid)
      if rem > 0 then
        total = total + rem
        emit({t = 'grant_expired', id = next_event_id(), g = gid, amt = rem, at = NOW})
      end
    end
    if #due < GRANT_SWEEP_PAGE then break end
  end
  if total > 0 then redis.call('HINCRBY', KEYS[K_ACCT], 'bal', 0 - total) end
  return total
end

-- What is available to spend (after sweep_grants): bal - res, by the invariant (below
-- zero while the organization owes on its credit line). Also reads the credit line.
local function usable_now()
  local v = redis.call('HMGET', KEYS[K_ACCT], 'bal', 'res', 'lim', 'debt')
  local usable = num(v[1]) - num(v[2])
  LINE_LIMIT, GRANTS_HOLD = num(v[3]), usable + num(v[4])
  return usable, num(v[1]), num(v[2])
end

-- THE check of every charging script (consume, consume_batch, reserve, debit, and the
-- gated consume of check_gate): may `amount` be charged when `usable` is available?
-- Usage and holds may take `available` down to minus the organization's credit line
-- (ops sets it; 0 = none, today's rule); `backed` = true for what must be backed by
-- credits that exist (adjustments, refunds): down to zero only. After usable_now.
local function may_charge(amount, usable, backed)
  local line = LINE_LIMIT
  if backed then line = 0 end
  return amount <= usable + line
end

-- The live grants in burn-down order (priority, then soonest expiry), read a page at a
-- time as charges need them. items: {gid, remaining, score}; avail: what the items read
-- so far still hold.
local function grants_cursor()
  return {items = {}, next_rank = 0, exhausted = false, pos = 1, avail = 0}
end

local function read_grants(cur)
  local rows = redis.call('ZRANGE', KEYS[K_GQ], cur.next_rank, cur.next_rank + GRANT_PAGE - 1, 'WITHSCORES')
  local ids = {}
  for i = 1, #rows, 2 do ids[#ids + 1] = rows[i] end
  cur.next_rank = cur.next_rank + #ids
  if #ids < GRANT_PAGE then cur.exhausted = true end
  if #ids == 0 then return end
  local left = redis.call('HMGET', KEYS[K_GREM], unpack_list(ids))
  for j, gid in ipairs(ids) do
    local rem = num(left[j])
    cur.items[#cur.items + 1] = {gid, rem, tonumber(rows[2 * j])}
    cur.avail = cur.avail + rem
  end
end

-- Take `amount` from the grants in order (in memory); returns the allocation as a flat
-- list {gid, amount, score, ...}, or nil (and takes nothing) when the grants do not
-- hold that much: the invariant says they do, so nil means the cache is broken and
-- the charge is refused rather than overdrawn.
local function take(cur, amount)
  while cur.avail < amount and not cur.exhausted do read_grants(cur) end
  if cur.avail < amount then
    redis.log(redis.LOG_WARNING, 'credits: grants of ' .. ORG .. ' hold less than bal - res')
    return nil
  end
  local alloc = {}
  local i = cur.pos
  while amount > 0 do
    local g = cur.items[i]
    local t = math.min(g[2], amount)
    if t > 0 then
      g[2] = g[2] - t
      g.dirty = true
      amount = amount - t
      cur.avail = cur.avail - t
      alloc[#alloc + 1] = g[1]
      alloc[#alloc + 1] = t
      alloc[#alloc + 1] = g[3]
    end
    if g[2] <= 0 then i = i + 1 end
  end
  cur.pos = i
  return alloc
end

-- A charge that may_charge allowed: from the grants in order as far as they hold, the
-- rest on the credit line (debt, written by flush_grants). Returns the allocation (see
-- take) and the part that became debt, or nil as take does.
local function take_charge(cur, amount)
  local from_grants = math.min(amount, math.max(0, GRANTS_HOLD))
  local alloc = take(cur, from_grants)
  if not alloc then return nil, 0 end
  local od = amount - from_grants
  GRANTS_HOLD = GRANTS_HOLD - from_grants
  cur.od = (cur.od or 0) + od
  return alloc, od
end

-- Write back the grants `take` changed; a grant spent to zero leaves the queues; and
-- the debt take_charge added.
local function flush_grants(cur)
  if cur.od and cur.od > 0 then
    redis.call('HINCRBY', KEYS[K_ACCT], 'debt', cur.od)
    cur.od = 0
  end
  for _, g in ipairs(cur.items) do
    if g.dirty then
      g.dirty = false
      if g[2] <= 0 then
        redis.call('HDEL', KEYS[K_GREM], g[1])
        redis.call('ZREM', KEYS[K_GQ], g[1])
        redis.call('ZREM', KEYS[K_GX], g[1])
      else
        redis.call('HSET', KEYS[K_GREM], g[1], g[2])
      end
    end
  end
end

-- Credits back to a grant (a hold's unused part, a new grant): into the queues again.
-- A grant whose expiry passed meanwhile expires at the next sweep, with its own event.
local function return_to_grant(gid, amount, score)
  redis.call('HINCRBY', KEYS[K_GREM], gid, amount)
  redis.call('ZADD', KEYS[K_GQ], score, gid)
  local expires = score % SCORE_SCALE
  if expires < NEVER then redis.call('ZADD', KEYS[K_GX], expires, gid) end
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
-- read in this call, and kept current here (so it can take again); `defer`: written
-- by rate_write later (a call that takes many tokens writes once).
local function rate_take(cred, default_rate, default_burst, c, defer)
  local rate = tonumber(c.rate) or default_rate
  local burst = tonumber(c.burst) or default_burst
  if rate <= 0 then return 0 end
  local tok = tonumber(c.tok) or burst
  local ts = tonumber(c.ts) or NOW
  if NOW > ts then tok = math.min(burst, tok + (NOW - ts) * rate / 1000) end
  if tok < 1 then
    return math.max(1, math.ceil((1 - tok) * 1000 / rate))
  end
  c.tok, c.ts = tok - 1, math.max(NOW, ts)
  if defer then
    c.rate_dirty = true
  else
    redis.call('HSET', KEYS[K_CREDS], cred .. '|tok', c.tok, cred .. '|ts', c.ts)
  end
  return 0
end

local function rate_write(cred, c)
  if c.rate_dirty then
    redis.call('HSET', KEYS[K_CREDS], cred .. '|tok', c.tok, cred .. '|ts', c.ts)
    c.rate_dirty = false
  end
end

-- Close one reservation: charge `used` from its allocation in order (then from its part
-- on the credit line), return the rest to the grants it came from (a grant that has
-- expired meanwhile expires again on the next scan, with its own event), and the unused
-- part on the credit line to it (the debt goes down: odr), give back department and
-- credential room.
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
  local odr = math.max(0, num(h.o) - to_charge)  -- what the line lent and was not used
  if odr > 0 then redis.call('HINCRBY', KEYS[K_ACCT], 'debt', 0 - odr) end
  if num(h.o) > 0 then redis.call('HINCRBY', KEYS[K_ACCT], 'hod', 0 - h.o) end
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
        g = charged, d = h.d, k = h.k, act = h.act, odr = odr > 0 and odr or nil, at = NOW})
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

-- The arguments every charging script (consume, batch, reserve, release) takes after
-- the leading three: ARGV[4] credential, [5] default rate, [6] default burst,
-- [7..9] current day / week / month start (ms), [10] idempotency fingerprint ('' none),
-- [11] idempotency ttl (ms).
local function charging_args(argv)
  return argv[4], tonumber(argv[5]), tonumber(argv[6]),
    {day = tonumber(argv[7]), week = tonumber(argv[8]), month = tonumber(argv[9])}, argv[10], tonumber(argv[11])
end

-- What every charging script checks first, in this order: the organization is loaded,
-- the idempotency key (a replay answers here), the credential is not revoked and has a
-- request token left; then expired holds return to available (and their room to the
-- credential's cap). Returns a reply to give at once, or nil with the credential's
-- state (spend read after the sweep) and how many holds closed.
local function preamble(cred, default_rate, default_burst, starts, fp)
  if not loaded() then return reply(NOT_LOADED, {}) end
  local replay = idem_check(K_IDEM, fp)
  if replay then return replay end
  local c = cred_state(cred)
  if c.revoked then return reply(UNAUTHENTICATED, {}) end
  local wait_ms = rate_take(cred, default_rate, default_burst, c)
  if wait_ms > 0 then return reply(RATE_LIMITED, {retry_after_ms = wait_ms}) end
  local closed = sweep_holds(starts)
  -- A hold of this credential that expired just now gave its room back.
  if closed > 0 then c.spent = num(redis.call('HGET', KEYS[K_CREDS], cred .. '|spent')) end
  return nil, c, closed
end

-- Entitlements (lua/check.lua, check_gate.lua, entitlements.lua): an organization's
-- features live in a hash of their own (same hash tag), given to the scripts that read
-- it as an extra key whose index they are told:
--   ver   the version Postgres gave them (a push of an older one changes nothing)
--   plan  the plan they come from ('' = the free defaults)
--   "f|<feature>"  msgpack {t = 'boolean' | 'limit' | 'config', e = 1 | 0 (enabled),
--                           l = limit (-1 unlimited), u = usage, v = value}
-- The gate of a feature: nil when the hash is not cached, else the feature with
-- ok = 1 (allowed) or ok = 0 and why = not_included | disabled | limit_reached.
local function entitlement_gate(key_index, feature)
  if redis.call('EXISTS', KEYS[key_index]) == 0 then return nil end
  local raw = redis.call('HGET', KEYS[key_index], 'f|' .. feature)
  if not raw then return {t = '', ok = 0, why = 'not_included'} end
  local f = unpack(raw)
  f.ok = 1
  if f.t == 'boolean' and f.e ~= 1 then
    f.ok, f.why = 0, 'disabled'
  elseif f.t == 'limit' and f.l >= 0 and f.u >= f.l then
    f.ok, f.why = 0, 'limit_reached'
  end
  return f
end

-- A charge's reply with the gate it passed (payload field `ent`).
local function with_gate(r, gate)
  if r[1] ~= OK and r[1] ~= REPLAY then return r end
  local p = unpack(r[2])
  p.ent = gate
  return {r[1], pack(p)}
end
