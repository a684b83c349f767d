-- Rebuilds a user's balance from a PostgreSQL snapshot, unless it is loaded already.
-- KEYS: acct, pend, cred.
-- ARGV: available, n, n x (credit_id, total), k, k x (rid, flushed 0|1), s, s x stale credit_id
-- The pairs describe one PostgreSQL snapshot: the user's current credit rows and which
-- of the pending request ids (read from KEYS[2] just before) it already holds.
-- Returns {1, bal}, or {0, 0} when pend no longer matches the snapshot (load again).
if redis.call('HEXISTS', KEYS[1], 'bal') == 1 then return {1, tonumber(redis.call('HGET', KEYS[1], 'bal'))} end
local bal = tonumber(ARGV[1])
local idx = 3
local snap = {}
for i = 1, tonumber(ARGV[2]) do snap[ARGV[idx]] = ARGV[idx + 1]; idx = idx + 2 end
local k = tonumber(ARGV[idx]); idx = idx + 1
local seenp = {}
for i = 1, k do seenp[ARGV[idx]] = ARGV[idx + 1]; idx = idx + 2 end
local cur = redis.call('HGETALL', KEYS[2])
local present = {}
for i = 1, #cur, 2 do
  local f = seenp[cur[i]]
  if f == nil then return {0, 0} end
  present[cur[i]] = true
  if f == '0' then bal = bal - tonumber(cur[i + 1]) end
end
for id, f in pairs(seenp) do
  if f == '0' and not present[id] then return {0, 0} end
end
local stale = {}
for i = 1, tonumber(ARGV[idx]) do stale[ARGV[idx + i]] = true end
local cred = redis.call('HGETALL', KEYS[3])
for i = 1, #cred, 2 do
  if stale[cred[i]] then
    redis.call('HDEL', KEYS[3], cred[i])
  elseif snap[cred[i]] == nil then
    -- Committed after the snapshot and announced by its grant: count it.
    bal = bal + tonumber(cred[i + 1])
  end
end
for id, total in pairs(snap) do redis.call('HSET', KEYS[3], id, total) end
-- Holds of a lost balance are meaningless: their settles charge in full.
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'bal', string.format('%d', bal))
return {1, bal}
