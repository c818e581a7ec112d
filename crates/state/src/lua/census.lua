-- census: every feed's counters and the oldest entries of its progress and
-- high-water indexes, in one call (the coordinator's gauges and `status`).
-- Returns {counts as field, value, ...; per feed: {feed, oldest progress or '', lowest high-water or ''}}.
local out = {}
for _, feed in ipairs(redis.call('SMEMBERS', FEEDS)) do
  local j = ctx(feed, '')
  local p = redis.call('ZRANGE', j.progress, 0, 0, 'WITHSCORES')
  local h = redis.call('ZRANGE', j.hw, 0, 0, 'WITHSCORES')
  out[#out + 1] = {feed, p[2] or '', h[2] or ''}
end
return {redis.call('HGETALL', COUNTS), out}
