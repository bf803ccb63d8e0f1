-- Delete KEYS[1] if it still holds our lease ARGV[1].
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
