-- Moves a live hold's expiry to now + ttl (the request is still running). `exp` stays:
-- it is only a lower bound of the earliest expiry, and a reserve that scans at it
-- finds nothing expired and raises it.
-- KEYS: acct. ARGV: rid, ttl_ms.
-- Returns 1, or 0 when rid holds nothing.
local f = 'h:' .. ARGV[1]
local v = redis.call('HGET', KEYS[1], f)
if not v then return 0 end
local t = redis.call('TIME')
local e = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], f, string.sub(v, 1, string.find(v, ':', 1, true) - 1) .. ':' .. string.format('%d', e))
return 1
