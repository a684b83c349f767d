-- Announces a committed credits row: records it in cred and, if the balance is
-- loaded, adds its amount. A row already recorded changes nothing.
-- KEYS: acct, cred. ARGV: credit_id, amount.
-- Returns {1, bal} when added to a loaded balance, else {0, 0}.
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 and redis.call('HEXISTS', KEYS[1], 'bal') == 1 then
  return {1, redis.call('HINCRBY', KEYS[1], 'bal', ARGV[2])}
end
return {0, 0}
