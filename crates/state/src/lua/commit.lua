-- commit: apply one page's commit if it chains; check everything, then write.
-- KEYS[1]  the job's hash
-- ARGV[1]  epoch            ARGV[2]  expected_seq
-- ARGV[3]  has_cursor 0/1   ARGV[4]  new_cursor
-- ARGV[5]  new_seq          ARGV[6]  has_high_water 0/1   ARGV[7] high_water (normalised)
-- ARGV[8]  record count     ARGV[9]  end_of_stream 0/1    ARGV[10] next_due_ms
-- ARGV[11] lease_ms
-- ARGV[12] restart 0/1 (with end_of_stream: the next chain starts from a start point)
-- ARGV[13] restart stage     ARGV[14] has_start_from 0/1    ARGV[15] start_from
-- Returns OK | ALREADY_APPLIED | FENCED | CONFLICT (same as Checkpoint::apply in tidemark-core).
local h = KEYS[1]
if redis.call('EXISTS', h) == 0 then return 'FENCED' end
local f = redis.call('HMGET', h, 'epoch', 'seq', 'cursor', 'phase', 'high_water')
local seq = tonumber(f[2]) or 0
local expected = tonumber(ARGV[2])
local new_seq = tonumber(ARGV[5])
local new_cursor = false
if ARGV[3] == '1' then new_cursor = ARGV[4] end
local restart = ARGV[9] == '1' and ARGV[12] == '1'
if restart then new_cursor = false end

if f[1] ~= ARGV[1] then return 'FENCED' end
if seq == new_seq and f[3] == new_cursor and new_seq == expected + 1 then return 'ALREADY_APPLIED' end
if f[4] ~= 'running' then return 'FENCED' end
if seq ~= expected or new_seq ~= expected + 1 then return 'CONFLICT' end

-- Checked; now write.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if new_cursor then redis.call('HSET', h, 'cursor', new_cursor) else redis.call('HDEL', h, 'cursor') end
redis.call('HSET', h, 'seq', ARGV[5])
if ARGV[6] == '1' then
  local old = f[5]
  local greater = true
  if old then
    local x, y = tonumber(ARGV[7]), tonumber(old)
    if x and y then greater = x > y else greater = ARGV[7] > old end
  end
  if greater then redis.call('HSET', h, 'high_water', ARGV[7]) end
end
redis.call('HINCRBY', h, 'pages', 1)
redis.call('HINCRBY', h, 'records', tonumber(ARGV[8]))
redis.call('HDEL', h, 'last_error')
redis.call('HSET', h, 'last_commit_ms', string.format('%.0f', now))
if ARGV[9] == '1' then
  redis.call('HSET', h, 'phase', 'idle', 'lease_until_ms', '0', 'last_eos_ms', string.format('%.0f', now),
    'next_due_ms', ARGV[10])
  if restart then
    redis.call('HSET', h, 'stage', ARGV[13])
    if ARGV[14] == '1' then redis.call('HSET', h, 'start_from', ARGV[15]) else redis.call('HDEL', h, 'start_from') end
  end
else
  redis.call('HSET', h, 'lease_until_ms', string.format('%.0f', now + tonumber(ARGV[11])))
end
return 'OK'
