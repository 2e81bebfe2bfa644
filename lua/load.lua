--[[ Load an organization's state from the Postgres ledger into an empty cache.
  Only the first load lands: a second (possibly older) snapshot finds the organization
  loaded and changes nothing, so a load never overwrites newer state. Grants pushed
  later are recognised by id (gapplied) and never counted twice. A cache written in
  another layout (an earlier version, see CACHE_FORMAT) is replaced.
  KEYS[1..12]  the organization's fixed keys (see lib.lua)
  ARGV[1] organization id        ARGV[2] now (ms)            ARGV[3] call id
  ARGV[4] snapshot, msgpack {
    gen,
    grants  = [{id, rem, prio, exp}]           live grants (remaining > 0; exp 0 = never)
    applied = [grant id, ...]                  grants a push may still arrive for
    costs   = {action = millicredits per unit}
    depts   = [{id, limit, period, pstart, spent}]
    creds   = [{id, cap, spent, revoked, rate, burst}]  (rate/burst -1 = default)
    holds   = [{id, a, al, d, ps, k, x, act, o}]  open reservations (o: on the credit line)
    limit, debt                                the credit line and what is owed on it }
  KEYS[13]     the partition's layout mark (how many partitions the cache is laid out in)
  ARGV[5] this process's partition count
  Returns {status, msgpack payload}: OK {balance} | ALREADY_LOADED {}
    | LAYOUT_CHANGED {partitions}: the cache is laid out in another number of partitions
      (or is being resized: 0); nothing is loaded, so no organization is ever cached
      under two partitions
]]
local layout = redis.call('GET', KEYS[13])
if layout and layout ~= ARGV[5] then return reply(LAYOUT_CHANGED, {partitions = tonumber(layout) or 0}) end
if loaded() then return reply(ALREADY_LOADED, {}) end
if not layout then redis.call('SET', KEYS[13], ARGV[5]) end
local s = unpack(ARGV[4])
for i = 1, N_FIXED - 1 do redis.call('DEL', KEYS[i]) end

local bal, res, hod = 0, 0, 0
for _, g in ipairs(s.grants) do
  local exp = g.exp
  if exp <= 0 then exp = NEVER end
  redis.call('HSET', KEYS[K_GREM], g.id, g.rem)
  redis.call('ZADD', KEYS[K_GQ], g.prio * SCORE_SCALE + exp, g.id)
  if exp < NEVER then redis.call('ZADD', KEYS[K_GX], exp, g.id) end
  bal = bal + g.rem
end
for _, gid in ipairs(s.applied) do redis.call('ZADD', KEYS[K_GAPPLIED], NOW, gid) end
for action, cost in pairs(s.costs) do redis.call('HSET', KEYS[K_COSTS], action, cost) end
for _, d in ipairs(s.depts) do
  redis.call('HSET', KEYS[K_DEPTS], d.id .. '|limit', d.limit, d.id .. '|period', d.period,
    d.id .. '|pstart', d.pstart, d.id .. '|spent', d.spent)
end
for _, c in ipairs(s.creds) do
  redis.call('HSET', KEYS[K_CREDS], c.id .. '|cap', c.cap, c.id .. '|spent', c.spent,
    c.id .. '|revoked', c.revoked)
  if c.rate >= 0 then redis.call('HSET', KEYS[K_CREDS], c.id .. '|rate', c.rate) end
  if c.burst >= 0 then redis.call('HSET', KEYS[K_CREDS], c.id .. '|burst', c.burst) end
end
for _, h in ipairs(s.holds) do
  redis.call('HSET', KEYS[K_HOLDS], h.id, pack({a = h.a, al = h.al, d = h.d, ps = h.ps,
    k = h.k, x = h.x, st = 'open', u = 0, act = h.act, o = (num(h.o) > 0 and h.o) or nil}))
  redis.call('ZADD', KEYS[K_HX], h.x, h.id)
  bal = bal + h.a
  res = res + h.a
  hod = hod + num(h.o)
end
local debt = num(s.debt)
bal = bal - debt  -- the invariant: bal - res == sum of grem - debt
redis.call('HSET', KEYS[K_ACCT], 'bal', bal, 'res', res, 'gen', s.gen, 'lim', num(s.limit), 'debt', debt, 'hod', hod,
  'loaded', CACHE_FORMAT)
return reply(OK, {balance = bal})
