-- control: pause, resume or rewind a job. Each takes a new epoch, so page
-- tasks of the old epoch are fenced.
-- ARGV[2] feed   ARGV[3] member
-- ARGV[4] op: pause | resume | rewind
-- ARGV[5] rewind target: start | cursor | time     ARGV[6] the cursor or the time (RFC 3339)
-- Returns the new epoch, or '' when the job does not exist.
local J = ctx(ARGV[2], ARGV[3])
local h = J.hash
if redis.call('EXISTS', h) == 0 then return '' end
local f = redis.call('HMGET', h, 'epoch', 'phase')
local now = now_ms()
local e = fmt(math.max((tonumber(f[1]) or 0) + 1, now * 1024))
redis.call('HSET', h, 'epoch', e, 'lease_until_ms', '0')
local n = fmt(now)
local due = now
local op = ARGV[4]
local to
if op == 'pause' then
  to = 'paused'
elseif op == 'resume' then
  to = 'idle'
  -- A child that was waiting for its parent, and whose parent did not
  -- change meanwhile, waits on.
  local rerun = redis.call('HDEL', h, 'rerun') == 1
  if (tonumber(redis.call('HGET', h, 'next_due_ms')) or 0) >= NEVER and not rerun then
    due = NEVER
  end
  redis.call('HSET', h, 'next_due_ms', fmt(due))
  drop(J, 'last_error')
elseif op == 'rewind' then
  -- Records read again give their children a new parent version.
  redis.call('HINCRBY', h, 'gen', 1)
  if ARGV[5] == 'cursor' then
    put(J, 'cursor', ARGV[6])
    redis.call('HDEL', h, 'start_from')
  elseif ARGV[5] == 'time' then
    redis.call('HSET', h, 'start_from', ARGV[6])
    drop(J, 'cursor')
  else
    drop(J, 'cursor')
    redis.call('HDEL', h, 'start_from', 'high_water', 't0', 'last_eos_ms')
    redis.call('HSET', h, 'stage', 'bulk')
    redis.call('ZREM', J.hw, J.member)
  end
  to = 'idle'
  if f[2] == 'paused' then to = 'paused' end
  redis.call('HSET', h, 'next_due_ms', n)
  drop(J, 'last_error')
else
  return redis.error_reply('unknown control op ' .. op)
end
redis.call('HSET', h, 'phase', to)
move(J, f[2], to, due, 0, now)
return e
