-- Keep our lease ARGV[1] on KEYS[1] for ARGV[2] more ms: restart its expiry, or take it
-- again if the key is free (it lapsed while we could not reach the store). 0 if the key
-- holds anything else (another request's lease, or a completed record). Sent again after
-- its reply was lost, it finds our lease and restarts the expiry once more: the same answer.
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
