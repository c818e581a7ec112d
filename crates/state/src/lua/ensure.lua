-- ensure: create a job's hash if it does not exist and register it.
-- KEYS[1] the job's hash   KEYS[2] the set of job keys
-- ARGV: field, value, field, value, ... of the initial checkpoint
-- Returns 1 when created, 0 when it existed.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
redis.call('SADD', KEYS[2], KEYS[1])
return 1
