-- Delete KEYS[1] if it still holds our lease ARGV[1]. 1 once the key is free of it: deleted
-- now, or already free (this call sent again after its reply was lost, or the lease
-- lapsed); 0 if the key holds anything else (another request's lease, a completed record).
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
if not current then
  return 1
end
return 0
