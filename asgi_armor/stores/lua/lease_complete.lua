-- Replace our lease ARGV[1] on KEYS[1] with the value ARGV[2] for ARGV[3] ms.
-- The key holding this very value is this call sent again (its reply was lost): done.
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
if current == ARGV[2] then
  return 1
end
return 0
