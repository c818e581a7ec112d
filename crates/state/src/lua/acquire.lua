-- acquire: take the lease of a job under a new epoch.
-- KEYS[1] the job's hash
-- ARGV[1] lease_ms   ARGV[2] force 0/1 (take it from a live lease or a failed job)
-- Returns {status, value}: {'GRANTED', epoch} | {'BUSY', lease_until_ms} | {'PAUSED', ''} |
--   {'FAILED', ''} | {'MISSING', ''}.
-- The epoch is max(stored + 1, now_ms * 1024): see tidemark_core::checkpoint::next_epoch.
local h = KEYS[1]
if redis.call('EXISTS', h) == 0 then return {'MISSING', ''} end
local f = redis.call('HMGET', h, 'epoch', 'phase', 'lease_until_ms')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local force = ARGV[2] == '1'
if f[2] == 'paused' then return {'PAUSED', ''} end
if f[2] == 'failed' and not force then return {'FAILED', ''} end
local lease = tonumber(f[3]) or 0
if f[2] == 'running' and lease > now and not force then return {'BUSY', string.format('%.0f', lease)} end

local epoch = math.max((tonumber(f[1]) or 0) + 1, now * 1024)
local e = string.format('%.0f', epoch)
redis.call('HSET', h, 'epoch', e, 'phase', 'running',
  'lease_until_ms', string.format('%.0f', now + tonumber(ARGV[1])))
redis.call('HDEL', h, 'last_error')
return {'GRANTED', e}
