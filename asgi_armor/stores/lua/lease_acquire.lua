-- Take the lease ARGV[1] on KEYS[1] for ARGV[2] ms if the key is free; else return its value.
-- The key holding this very lease is this call sent again (its reply was lost): taken.
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  return false
end
if current then
  return current
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
