-- lease: renew, release or fail a job's lease, recover it from a lost cursor,
-- or stamp its T0, only under its current epoch.
-- KEYS[1] the job's hash
-- ARGV[1] op: renew | release | fail | recover | t0   ARGV[2] epoch
-- ARGV[3] lease_ms (renew), error text (fail), start_from or '' (recover), T0 (t0)
-- Returns 1 when applied, 0 when the epoch is not current (fenced) or the job is not running.
local h = KEYS[1]
local f = redis.call('HMGET', h, 'epoch', 'phase')
if f[1] ~= ARGV[2] or f[2] ~= 'running' then return 0 end
if ARGV[1] == 'renew' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', h, 'lease_until_ms', string.format('%.0f', now + tonumber(ARGV[3])))
elseif ARGV[1] == 'release' then
  redis.call('HSET', h, 'lease_until_ms', '0')
elseif ARGV[1] == 'fail' then
  redis.call('HSET', h, 'phase', 'failed', 'lease_until_ms', '0', 'last_error', ARGV[3])
elseif ARGV[1] == 'recover' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HDEL', h, 'cursor')
  if ARGV[3] == '' then redis.call('HDEL', h, 'start_from') else redis.call('HSET', h, 'start_from', ARGV[3]) end
  redis.call('HSET', h, 'phase', 'idle', 'lease_until_ms', '0', 'next_due_ms', string.format('%.0f', now))
  redis.call('HINCRBY', h, 'recoveries', 1)
elseif ARGV[1] == 't0' then
  if redis.call('HEXISTS', h, 't0') == 0 then redis.call('HSET', h, 't0', ARGV[3]) end
else
  return redis.error_reply('unknown lease op ' .. ARGV[1])
end
return 1
