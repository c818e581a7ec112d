-- source_pause: pause a whole source until a time, never shortening a longer pause.
-- KEYS[1] the source's pause key   ARGV[1] until, unix ms
local cur = tonumber(redis.call('GET', KEYS[1])) or 0
if tonumber(ARGV[1]) > cur then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('PEXPIREAT', KEYS[1], ARGV[1])
end
return 1
