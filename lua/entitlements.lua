--[[ Mirror an organization's entitlements, as Postgres holds them, into the cache.
  KEYS[1..12]  the organization's fixed keys (see lib.lua)
  KEYS[13]     the organization's entitlements hash (see lib.lua, entitlement_gate)
  ARGV[1] organization id        ARGV[2] now (ms)            ARGV[3] call id
  ARGV[4] version (Postgres: raised by every change of plan, catalog, override, usage)
  ARGV[5] plan id ('' = free defaults)
  ARGV[6] msgpack [{f = feature, t, e, l, u, v}]             ARGV[7] time to live (ms)
  Returns {status, msgpack payload}:
    OK {version}       replaced
    STALE {version}    the cache holds this version or a newer one: nothing changed
                       (its time to live starts again when it is the same version)
  No stale write wins: a push computed before a newer one never replaces it.
]]
local version, plan, ttl_ms = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[7])
local key = KEYS[13]
local held = tonumber(redis.call('HGET', key, 'ver'))
if held and held >= version then
  if held == version then redis.call('PEXPIRE', key, ttl_ms) end
  return reply(STALE, {version = held})
end
redis.call('DEL', key)
local fields = {'ver', version, 'plan', plan}
for _, f in ipairs(unpack(ARGV[6])) do
  fields[#fields + 1] = 'f|' .. f.f
  fields[#fields + 1] = pack({t = f.t, e = f.e, l = f.l, u = f.u, v = f.v})
end
redis.call('HSET', key, unpack_list(fields))
redis.call('PEXPIRE', key, ttl_ms)
return reply(OK, {version = version})
