-- control: pause, resume or rewind a job. Each takes a new epoch, so page
-- tasks of the old epoch are fenced.
-- KEYS[1] the job's hash
-- ARGV[1] op: pause | resume | rewind
-- ARGV[2] rewind target: start | cursor | time     ARGV[3] the cursor or the time (RFC 3339)
-- Returns the new epoch, or '' when the job does not exist.
local h = KEYS[1]
if redis.call('EXISTS', h) == 0 then return '' end
local f = redis.call('HMGET', h, 'epoch', 'phase')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local e = string.format('%.0f', math.max((tonumber(f[1]) or 0) + 1, now * 1024))
redis.call('HSET', h, 'epoch', e, 'lease_until_ms', '0')
local n = string.format('%.0f', now)
if ARGV[1] == 'pause' then
  redis.call('HSET', h, 'phase', 'paused')
elseif ARGV[1] == 'resume' then
  redis.call('HSET', h, 'phase', 'idle', 'next_due_ms', n)
  redis.call('HDEL', h, 'last_error')
elseif ARGV[1] == 'rewind' then
  if ARGV[2] == 'cursor' then
    redis.call('HSET', h, 'cursor', ARGV[3])
    redis.call('HDEL', h, 'start_from')
  elseif ARGV[2] == 'time' then
    redis.call('HSET', h, 'start_from', ARGV[3])
    redis.call('HDEL', h, 'cursor')
  else
    redis.call('HDEL', h, 'cursor', 'start_from', 'high_water', 't0', 'last_eos_ms')
    redis.call('HSET', h, 'stage', 'bulk')
  end
  if f[2] ~= 'paused' then redis.call('HSET', h, 'phase', 'idle') end
  redis.call('HSET', h, 'next_due_ms', n)
  redis.call('HDEL', h, 'last_error')
else
  return redis.error_reply('unknown control op ' .. ARGV[1])
end
return e
