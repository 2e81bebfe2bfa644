--[[ Read, in one atomic step, what reconciliation compares with the ledger.
  KEYS[1..12]  the organization's fixed keys (see lib.lua)
  ARGV[1] organization id        ARGV[2] now (ms)            ARGV[3] call id
  ARGV[4] first stream entry the ledger does not hold (its watermark + 1)
  ARGV[5] most entries to scan   ARGV[6] grants in the outbox, msgpack [id, amount, ...]
  Returns {status, msgpack payload}:
    OK {balance, in_flight, unpushed, scanned, truncated, oldest, debt, debt_in_flight}   (millicredits)
       in_flight: the balance change of this organization's entries not yet settled
       debt_in_flight: the debt change of those entries (charges past the grants, less
                  what grants repaid)
       oldest:    the id of the first of those entries ('' when there is none)
       unpushed:  outbox grants the cache has not applied yet
    NOT_LOADED {}   nothing cached: nothing to compare
]]
local after, scan_max = ARGV[4], tonumber(ARGV[5])
local outbox = unpack(ARGV[6])
if not loaded() then return reply(NOT_LOADED, {}) end

local rows = redis.call('XRANGE', KEYS[K_STREAM], after, '+', 'COUNT', scan_max + 1)
local in_flight, scanned, oldest, debt_in_flight = 0, 0, '', 0
for i = 1, math.min(#rows, scan_max) do
  scanned = scanned + 1
  local fields = rows[i][2]
  local org, data = nil, nil
  for j = 1, #fields, 2 do
    if fields[j] == 'o' then org = fields[j + 1] elseif fields[j] == 'd' then data = fields[j + 1] end
  end
  if org == ORG and data then
    if oldest == '' then oldest = rows[i][1] end
    local decoded, ev = pcall(unpack, data)  -- an entry that is not ours to read counts nothing
    if decoded and type(ev) == 'table' then
      if ev.t == 'use' or ev.t == 'grant_expired' or ev.t == 'adjustment' or ev.t == 'refund' then
        in_flight = in_flight - num(ev.amt)
        debt_in_flight = debt_in_flight + num(ev.od)
      elseif ev.t == 'use_batch' and type(ev.ev) == 'table' then
        for _, item in ipairs(ev.ev) do
          in_flight = in_flight - num(item.amt)
          debt_in_flight = debt_in_flight + num(item.od)
        end
      elseif ev.t == 'grant_applied' then
        debt_in_flight = debt_in_flight - num(ev.rp)
      elseif ev.t == 'hold_closed' then
        in_flight = in_flight - num(ev.used)
        debt_in_flight = debt_in_flight - num(ev.odr)
      elseif ev.t == 'hold' then
        debt_in_flight = debt_in_flight + num(ev.od)
      end
    end
  end
end
local unpushed = 0
for i = 1, #outbox, 2 do
  if not redis.call('ZSCORE', KEYS[K_GAPPLIED], outbox[i]) then unpushed = unpushed + outbox[i + 1] end
end
return reply(OK, {balance = num(redis.call('HGET', KEYS[K_ACCT], 'bal')), in_flight = in_flight,
                  unpushed = unpushed, scanned = scanned, truncated = #rows > scan_max, oldest = oldest,
                  debt = num(redis.call('HGET', KEYS[K_ACCT], 'debt')), debt_in_flight = debt_in_flight})
