-- Remember KEYS[1] for ARGV[2] ms, holding this call's token ARGV[1]. 1 if it was new, or
-- already holds this token (this call sent again after its reply was lost); 0 if it holds
-- another call's token: the message was seen before.
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if current == ARGV[1] then
  return 1
end
return 0
