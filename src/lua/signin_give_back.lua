-- Gives a sign-in attempt back (or clears the count) and lifts the lock only if this
-- attempt armed it.
-- KEYS: count, lock. ARGV: the attempt's n, '1' to clear the count (else give one back).
-- Returns the reply of the DEL or DECR of the count.
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
if ARGV[2] == '1' then return redis.call('DEL', KEYS[1]) end
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n <= 1 then return redis.call('DEL', KEYS[1]) end
return redis.call('DECR', KEYS[1])
