-- ratelimit: GCRA, one permit per call, shared by every process of a source.
-- KEYS[1] the source's limiter key (holds the theoretical arrival time, unix µs)
-- ARGV[1] emission interval in µs (1e6 / per_second)   ARGV[2] burst (>= 1)
-- Returns {1, 0} when granted, {0, µs to wait} when not.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then return {0, math.ceil(allow_at - now)} end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, 0}
