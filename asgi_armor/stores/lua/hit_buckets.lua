-- Token buckets decided together: take ARGV[1] tokens from every bucket, or from none.
-- KEYS[i]: bucket i. ARGV[2i], ARGV[2i+1]: its emission interval and tolerance (seconds).
-- The exact formula of asgi_armor/ratelimit/bucket.py `decide`; time is Redis's own
-- clock, so every app process agrees. Seconds are counted from 2023-11-14 (1.7e9) to keep
-- sub-microsecond precision in a double.
--
-- Times travel as numbers, never through string.format: a number given to redis.call is
-- written by Redis in C with every digit a double needs, and {double = x} is a reply Redis
-- writes the same way (a bulk string to RESP2 clients). Formatting them here was a third
-- of the script's time (docs/stores.md, "The script").
--
-- A negative ARGV[1] gives back what an earlier call took (the cluster store, when a
-- decision spans several hash slots and another slot denied): ARGV[2i] is the seconds
-- that call added to bucket i, ARGV[2i+1] the bucket's full-at time before it (both in
-- this server's clock). Never more than that call took; and the part time has refilled
-- since is kept, because had that call never happened the bucket would have been full
-- for that long, and a full bucket gains nothing (docs/stores.md, Redis Cluster).
local t = redis.call('TIME')
local now = (tonumber(t[1]) - 1700000000) + tonumber(t[2]) / 1000000
local cost = tonumber(ARGV[1])
local epsilon = 1e-6  -- bucket.py EPSILON
local out = {1, {double = now}}
if cost < 0 then
  for i = 1, #KEYS do
    local tat = tonumber(redis.call('GET', KEYS[i]))
    if tat == nil or tat < now then
      tat = now
    else
      local back = tonumber(ARGV[2 * i]) - math.max(0, now - tonumber(ARGV[2 * i + 1]))
      if back > 0 then
        tat = math.max(now, tat - back)
        if tat > now then
          redis.call('SET', KEYS[i], tat, 'PX', math.ceil((tat - now) * 1000) + 1)
        else
          redis.call('DEL', KEYS[i])
        end
      end
    end
    out[i + 2] = {double = tat}
  end
  return out
end
local tats = {}
local intervals = {}
for i = 1, #KEYS do
  local tat = tonumber(redis.call('GET', KEYS[i]))
  if tat == nil or tat < now then
    tat = now
  end
  local interval = tonumber(ARGV[2 * i])
  tats[i] = tat
  intervals[i] = interval
  if tat + cost * interval - now > tonumber(ARGV[2 * i + 1]) + epsilon then
    out[1] = 0
  end
end
local take = out[1] == 1 and cost > 0
for i = 1, #KEYS do
  local tat = tats[i]
  if take then
    tat = tat + cost * intervals[i]
    -- The key may vanish once the bucket is full again: absent means full.
    redis.call('SET', KEYS[i], tat, 'PX', math.ceil((tat - now) * 1000) + 1)
  end
  out[i + 2] = {double = tat}
end
return out
