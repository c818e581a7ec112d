-- acquire: take the lease of a job under a new epoch.
-- ARGV[2] feed   ARGV[3] member
-- ARGV[4] lease_ms   ARGV[5] force 0/1 (take it from a live lease or a failed job)
-- Returns {status, value}: {'GRANTED', epoch} | {'BUSY', lease_until_ms} | {'PAUSED', ''} |
--   {'FAILED', ''} | {'MISSING', ''}.
-- The epoch is max(stored + 1, now_ms * 1024): see tidemark_core::checkpoint::next_epoch.
local J = ctx(ARGV[2], ARGV[3])
if redis.call('EXISTS', J.hash) == 0 then return {'MISSING', ''} end
local f = redis.call('HMGET', J.hash, 'epoch', 'phase', 'lease_until_ms')
local now = now_ms()
local force = ARGV[5] == '1'
if f[2] == 'paused' then return {'PAUSED', ''} end
if f[2] == 'failed' and not force then return {'FAILED', ''} end
local lease = tonumber(f[3]) or 0
if f[2] == 'running' and lease > now and not force then return {'BUSY', fmt(lease)} end

local e = fmt(math.max((tonumber(f[1]) or 0) + 1, now * 1024))
local deadline = now + tonumber(ARGV[4])
redis.call('HSET', J.hash, 'epoch', e, 'phase', 'running', 'lease_until_ms', fmt(deadline))
drop(J, 'last_error')
move(J, f[2], 'running', 0, deadline, now)
return {'GRANTED', e}
