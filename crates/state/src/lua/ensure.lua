-- ensure: create jobs that do not exist and register them; a job whose hash
-- exists but is not registered (retired, or written by a version without
-- indexes) joins the indexes with its state as it is. Never overwrites.
-- ARGV[2] n, the number of field/value pairs common to every new job
-- ARGV[3 .. 2+2n] those pairs (the initial checkpoint)
-- then per job: feed, member (encoded partition), partition
-- Returns how many jobs were created or joined.
local n = tonumber(ARGV[2])
local common = {}
for i = 3, 2 + 2 * n do common[#common + 1] = ARGV[i] end
local now = now_ms()
local joined = 0
for i = 3 + 2 * n, #ARGV, 3 do
  local j = ctx(ARGV[i], ARGV[i + 1])
  if redis.call('EXISTS', j.hash) == 0 then
    redis.call('HSET', j.hash, 'feed', ARGV[i], 'partition', ARGV[i + 2], unpack(common))
  end
  joined = joined + join(j, now)
end
return joined
