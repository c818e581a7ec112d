-- retire: take a job out of every index (its feed or partition left the
-- config). The hash stays, under a new epoch that fences the chain in
-- flight; a running job is left idle and due, so it walks on if it comes back.
-- ARGV[2] feed   ARGV[3] member
-- Returns 1 when retired, 0 when it was not registered.
local J = ctx(ARGV[2], ARGV[3])
if not registered(J) then return 0 end
local f = redis.call('HMGET', J.hash, 'epoch', 'phase', 'records')
local now = now_ms()
leave(J, f[2] or 'idle')
add_records(J, -(tonumber(f[3]) or 0))
redis.call('ZREM', J.jobs, J.member)
redis.call('ZREM', J.progress, J.member)
redis.call('ZREM', J.hw, J.member)
if redis.call('ZCARD', J.jobs) == 0 then redis.call('SREM', FEEDS, J.feed) end
-- A child job or batch slot is made by its parent's commits, not listed in
-- the config: keep it findable, for a tenant that comes back or a purge.
if redis.call('HEXISTS', J.hash, 'pv') == 1 or redis.call('HEXISTS', J.hash, 'bsize') == 1 then
  redis.call('ZADD', J.retired, 0, J.member)
end
redis.call('HSET', J.hash, 'epoch', fmt(math.max((tonumber(f[1]) or 0) + 1, now * 1024)), 'lease_until_ms', '0')
if f[2] == 'running' then redis.call('HSET', J.hash, 'phase', 'idle', 'next_due_ms', fmt(now)) end
return 1
