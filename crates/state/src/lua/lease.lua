-- lease: take, renew, release or fail a job's lease, recover it from a lost
-- cursor, or stamp its T0, only under its current epoch while it runs.
-- ARGV[2] feed   ARGV[3] member
-- ARGV[4] op: take | renew | release | fail | recover | t0   ARGV[5] epoch
-- ARGV[6] lease_ms (take, renew), error text (fail), start_from or '' (recover), T0 (t0)
-- ARGV[7] the task's seq (take)
-- Returns, for take: the job's hash as field, value, ... (empty when it does
-- not exist), the lease taken only when the epoch and seq are the task's and
-- the job runs. For the others: 1 when applied, 0 when fenced or not running.
local J = ctx(ARGV[2], ARGV[3])
local h = J.hash
local op = ARGV[4]
local f = redis.call('HMGET', h, 'epoch', 'phase', 'seq')
local current = f[1] == ARGV[5] and f[2] == 'running'
if op == 'take' then
  if current and f[3] == ARGV[7] then
    local deadline = now_ms() + tonumber(ARGV[6])
    redis.call('HSET', h, 'lease_until_ms', fmt(deadline))
    extend(J, deadline)
  end
  return whole(J)
end
if not current then return 0 end
if op == 'renew' then
  local deadline = now_ms() + tonumber(ARGV[6])
  redis.call('HSET', h, 'lease_until_ms', fmt(deadline))
  extend(J, deadline)
elseif op == 'release' then
  redis.call('HSET', h, 'lease_until_ms', '0')
  extend(J, 0)
elseif op == 'fail' then
  local now = now_ms()
  redis.call('HSET', h, 'phase', 'failed', 'lease_until_ms', '0')
  put(J, 'last_error', ARGV[6])
  move(J, 'running', 'failed', 0, 0, now)
elseif op == 'recover' then
  local now = now_ms()
  drop(J, 'cursor')
  if ARGV[6] == '' then redis.call('HDEL', h, 'start_from') else redis.call('HSET', h, 'start_from', ARGV[6]) end
  redis.call('HSET', h, 'phase', 'idle', 'lease_until_ms', '0', 'next_due_ms', fmt(now))
  redis.call('HINCRBY', h, 'recoveries', 1)
  move(J, 'running', 'idle', now, 0, now)
elseif op == 't0' then
  if redis.call('HEXISTS', h, 't0') == 0 then redis.call('HSET', h, 't0', ARGV[6]) end
else
  return redis.error_reply('unknown lease op ' .. op)
end
return 1
