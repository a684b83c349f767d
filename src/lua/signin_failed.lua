-- A wrong password re-arms the lock its attempt armed (or that expired while it was
-- checked) so that it lasts its full time from the failure; never a lock armed by a
-- later attempt, nor after the count was cleared or given back below n.
-- KEYS: count, lock. ARGV: the attempt's n, max failures, max lock ms, first lock ms.
-- Returns 1 when the lock was re-armed, else 0.
local n = tonumber(ARGV[1])
local max = tonumber(ARGV[2])
if n < max then return 0 end
local cur = redis.call('GET', KEYS[2])
if cur and tonumber(cur) > n then return 0 end
if tonumber(redis.call('GET', KEYS[1]) or '0') < n then return 0 end
local ms = tonumber(ARGV[4]) * 2 ^ math.min(n - max, 30)
ms = math.min(ms, tonumber(ARGV[3]))
redis.call('SET', KEYS[2], n, 'PX', math.floor(ms))
return 1
