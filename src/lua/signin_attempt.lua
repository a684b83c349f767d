-- Counts a sign-in attempt of one subject (account or IP) unless its lock is set;
-- the attempt that brings the count to the maximum (and each one admitted after it)
-- arms the lock for first lock ms * 2^(n - max failures), at most max lock ms.
-- KEYS: count, lock. ARGV: window ms, max failures, max lock ms, first lock ms.
-- Returns {n, 0} when admitted as the subject's n-th attempt of the window, {0, ms}
-- when refused with the lock's remaining time.
local ttl = redis.call('PTTL', KEYS[2])
if ttl ~= -2 then return {0, ttl} end
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local max = tonumber(ARGV[2])
if n >= max then
  local ms = tonumber(ARGV[4]) * 2 ^ math.min(n - max, 30)
  ms = math.min(ms, tonumber(ARGV[3]))
  redis.call('SET', KEYS[2], n, 'PX', math.floor(ms))
end
return {n, 0}
