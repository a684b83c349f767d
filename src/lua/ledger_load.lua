-- Sets a user's live balance from a PostgreSQL snapshot: loads it when it is not in
-- Redis (mode 'load'; a loaded balance is left as it is), or rebases a loaded one after
-- a change of its credits rows or subscription status (mode 'rebase'; a balance not
-- loaded is left to load itself). A rebase keeps the holds of requests in flight.
-- KEYS: acct, pend, cred.
-- ARGV: mode, off (1 when the subscription is inactive), available, n, n x (credit_id,
--       total), k, k x (rid, flushed 0|1), s, s x stale credit_id
-- The pairs describe one PostgreSQL snapshot: the user's current credit rows and which
-- of the pending request ids (read from KEYS[2] just before) it already holds; stale
-- ids are rows cred knew that are no longer current. cred maps each row the balance
-- reflects to its total, and each retired row to 'x' (a tombstone: a row never comes
-- back, so a snapshot that still calls it current is older than the balance).
-- Returns {1, bal}; {0, 0} when the snapshot is out of date (take another); {2, 0} for a
-- rebase of a balance that is not loaded.
local loaded = redis.call('HEXISTS', KEYS[1], 'bal') == 1
if ARGV[1] == 'load' and loaded then return {1, tonumber(redis.call('HGET', KEYS[1], 'bal'))} end
if ARGV[1] == 'rebase' and not loaded then return {2, 0} end
local bal = tonumber(ARGV[3])
local idx = 5
local snap = {}
for i = 1, tonumber(ARGV[4]) do snap[ARGV[idx]] = ARGV[idx + 1]; idx = idx + 2 end
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
  local id, v = cred[i], cred[i + 1]
  if v == 'x' then
    if snap[id] then return {0, 0} end
  elseif stale[id] then
    redis.call('HSET', KEYS[3], id, 'x')
  elseif snap[id] == nil then
    -- Committed after the snapshot and announced by its grant: count it.
    bal = bal + tonumber(v)
  end
end
for id, total in pairs(snap) do redis.call('HSET', KEYS[3], id, total) end
if loaded then
  -- What requests in flight hold stays held.
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    local f = all[i]
    if string.byte(f, 1) == 104 and string.byte(f, 2) == 58 then -- 'h:'
      local h = all[i + 1]
      bal = bal - tonumber(string.sub(h, 1, string.find(h, ':', 1, true) - 1))
    end
  end
else
  -- Holds of a lost balance are meaningless: their settles charge in full.
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 'bal', string.format('%d', bal))
if ARGV[2] == '1' then redis.call('HSET', KEYS[1], 'off', '1') else redis.call('HDEL', KEYS[1], 'off') end
return {1, bal}
