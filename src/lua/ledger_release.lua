-- Releases a hold: returns its amount to the balance (if the balance is loaded).
-- KEYS: acct. ARGV: rid.
-- Returns 1, or 0 when rid holds nothing.
local f = 'h:' .. ARGV[1]
local v = redis.call('HGET', KEYS[1], f)
if not v then return 0 end
redis.call('HDEL', KEYS[1], f)
if redis.call('HEXISTS', KEYS[1], 'bal') == 1 then
  redis.call('HINCRBY', KEYS[1], 'bal', string.sub(v, 1, string.find(v, ':', 1, true) - 1))
end
return 1
