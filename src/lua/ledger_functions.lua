-- The ledger's hot-path operations as Lua functions: now_ms, reserve and settle, each
-- described above it. Not a script on its own: ledger.rs prepends it to
-- ledger_batch.lua, whose KEYS and ARGV name the functions' keys and arguments.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Holds ceil((p + m) * price / 1000) under rid, lowering m (not below minm) to what the
-- balance affords. Returns {status (1 admitted, 0 refused, -1 not loaded, -2 the
-- subscription is inactive), hold, m, bal}.
local function reserve(acct, rid, price, p, m, minm, ttl, now)
  local v = redis.call('HMGET', acct, 'bal', 'exp', 'off')
  if not v[1] then return {-1, 0, 0, 0} end
  local bal = tonumber(v[1])
  if v[3] then return {-2, 0, 0, bal} end
  local changed = false
  local exp = v[2] and tonumber(v[2])
  if exp and exp <= now then
    -- Some hold expired (a crash): return every expired hold to the balance.
    exp = nil
    local all = redis.call('HGETALL', acct)
    for i = 1, #all, 2 do
      local f = all[i]
      if string.byte(f, 1) == 104 and string.byte(f, 2) == 58 then -- 'h:'
        local h = all[i + 1]
        local sep = string.find(h, ':', 1, true)
        local e = tonumber(string.sub(h, sep + 1))
        if e <= now then
          bal = bal + tonumber(string.sub(h, 1, sep - 1))
          redis.call('HDEL', acct, f)
        elseif not exp or e < exp then
          exp = e
        end
      end
    end
    if exp then redis.call('HSET', acct, 'exp', string.format('%d', exp)) else redis.call('HDEL', acct, 'exp') end
    changed = true
  end
  local cost = math.ceil((p + m) * price / 1000)
  local status = 1
  if cost > bal then
    status = 0
    if price > 0 and minm > 0 and bal > 0 then
      local afford = math.floor(bal * 1000 / price) - p
      if afford >= minm then
        if afford < m then m = afford end
        cost = math.ceil((p + m) * price / 1000)
        if cost <= bal then status = 1 end
      end
    end
  end
  if status == 1 then
    bal = bal - cost
    local e = now + ttl
    if exp and exp <= e then
      redis.call('HSET', acct, 'bal', string.format('%d', bal), 'h:' .. rid, string.format('%d:%d', cost, e))
    else
      redis.call('HSET', acct, 'bal', string.format('%d', bal), 'h:' .. rid, string.format('%d:%d', cost, e),
        'exp', string.format('%d', e))
    end
  elseif changed then
    redis.call('HSET', acct, 'bal', string.format('%d', bal))
  end
  return {status, cost, m, bal}
end

-- Charges cost, releases the rest of rid's hold and appends the usage event.
-- Returns {1, bal}; {2, 0} when the balance is not loaded (the charge is recorded all
-- the same); {0, 0} when rid was already settled.
local function settle(acct, pend, stream, rid, cost, ev)
  local f = 'h:' .. rid
  local held = 0
  local v = redis.call('HGET', acct, f)
  if v then
    held = tonumber(string.sub(v, 1, string.find(v, ':', 1, true) - 1))
    redis.call('HDEL', acct, f)
  elseif redis.call('HEXISTS', pend, rid) == 1 then
    return {0, 0}
  end
  local out = {2, 0}
  if redis.call('HEXISTS', acct, 'bal') == 1 then
    out = {1, redis.call('HINCRBY', acct, 'bal', string.format('%d', held - tonumber(cost)))}
  end
  redis.call('HSET', pend, rid, cost)
  redis.call('XADD', stream, '*', 'e', ev)
  return out
end
