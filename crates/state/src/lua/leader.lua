-- leader: take or renew the coordinator leadership, or resign it.
-- KEYS[1] the leader key
-- ARGV[1] op: lead | resign   ARGV[2] candidate id   ARGV[3] ttl_ms (lead)
-- Returns 1 when the candidate leads (lead) or resigned (resign), else 0.
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == 'lead' then
  if cur == false then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    return 1
  elseif cur == ARGV[2] then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return 1
  end
  return 0
end
if cur == ARGV[2] then redis.call('DEL', KEYS[1]) return 1 end
return 0
