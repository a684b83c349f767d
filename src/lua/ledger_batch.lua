-- Many reserves and settles of one bucket in one call (group commit); runs after the
-- functions of ledger_functions.lua, prepended to it.
-- KEYS: the accts, pends and streams the ops name (all of one bucket).
-- ARGV: op records, each `r, acct#, rid, price, p, m, minm, ttl` (a reserve) or
-- `s, acct#, pend#, stream#, rid, cost, event` (a settle); # = an index into KEYS.
-- Returns one result per op, in order (see reserve and settle).
local out = {}
local i = 1
local now = nil
while i <= #ARGV do
  if ARGV[i] == 'r' then
    now = now or now_ms()
    out[#out + 1] = reserve(KEYS[tonumber(ARGV[i + 1])], ARGV[i + 2], tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4]),
      tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6]), tonumber(ARGV[i + 7]), now)
    i = i + 8
  else
    out[#out + 1] = settle(KEYS[tonumber(ARGV[i + 1])], KEYS[tonumber(ARGV[i + 2])], KEYS[tonumber(ARGV[i + 3])],
      ARGV[i + 4], ARGV[i + 5], ARGV[i + 6])
    i = i + 7
  end
end
return out
