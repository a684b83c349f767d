-- Forgets usage events flushed to PostgreSQL: acknowledges and deletes their stream
-- entries and removes their request ids from the pend hashes. Variadic commands in
-- chunks (Lua's unpack limit): three commands per thousand entries instead of three
-- per entry.
-- KEYS: stream, then pend keys.
-- ARGV: group, n, n entry ids, then for each pend key in KEYS order: count, request ids.
-- Returns the number of entries acknowledged.
local n = tonumber(ARGV[2])
local acked = 0
local i = 3
while i < 3 + n do
  local j = math.min(i + 999, 2 + n)
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, i, j))
  redis.call('XDEL', KEYS[1], unpack(ARGV, i, j))
  i = j + 1
end
local k = 2
while i <= #ARGV do
  local c = tonumber(ARGV[i])
  local s = i + 1
  local last = i + c
  while s <= last do
    local e = math.min(s + 999, last)
    redis.call('HDEL', KEYS[k], unpack(ARGV, s, e))
    s = e + 1
  end
  i = last + 1
  k = k + 1
end
return acked
