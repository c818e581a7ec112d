-- purge: delete the state of a retired job (its tenant was removed and the
-- operator asked for --purge). A registered job is never purged: retire it
-- first. Deleting the hash leaves no epoch behind, so the job's next
-- ensure starts it afresh.
-- ARGV[2] feed   ARGV[3] member
-- Returns 1 when purged, 0 when there was nothing to purge, -1 when the job
-- is registered.
local J = ctx(ARGV[2], ARGV[3])
if registered(J) then return -1 end
redis.call('ZREM', J.retired, J.member)
local n = redis.call('DEL', J.hash, side(J, 'cursor'), side(J, 'last_error'), side(J, 'vars'), side(J, 'batch'))
if n > 0 then return 1 end
return 0
