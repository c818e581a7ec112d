-- fleet: the workers the coordinator can see, for admission control.
-- KEYS[1] the workers zset (member 'id|concurrency', score: expiry, unix ms)
-- ARGV[1] op: beat | leave | list   ARGV[2] member (beat, leave)   ARGV[3] ttl_ms (beat)
-- Returns, for list: the live members; else 1.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[1] == 'beat' then
  redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[3])), ARGV[2])
elseif ARGV[1] == 'leave' then
  redis.call('ZREM', KEYS[1], ARGV[2])
elseif ARGV[1] == 'list' then
  return redis.call('ZRANGE', KEYS[1], 0, -1)
else
  return redis.error_reply('unknown fleet op ' .. ARGV[1])
end
return 1
