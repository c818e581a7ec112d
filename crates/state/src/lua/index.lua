-- index: the scheduler's indexes, kept by every script that changes a job
-- (DESIGN.md, "Scheduling"). This text is put in front of those scripts.
-- ARGV[1] is always the key prefix; a script's job is ARGV[2] (feed) and
-- ARGV[3] (the partition as it appears in keys: percent-encoded).
--
-- For every registered job of feed F, member M (the encoded partition):
--   <P>feed:F:jobs      zset, score 0          every registered job (lexicographic pages)
--   <P>feed:F:due       zset, next_due_ms      the idle jobs
--   <P>running          zset, deadline ms      every running chain, member 'F:M'
--   <P>feed:F:failed    zset, failed at ms     the failed jobs
--   <P>feed:F:progress  zset, ms               when the cursor last moved (or the job was made)
--   <P>feed:F:hw        zset, ms               the high-water mark, when it is a time
--                                              (neither for a child job, its hash has 'pv', nor a batch
--                                              slot, 'bsize': an idle one does not age, it waits for its parent)
--   <P>counts           hash 'F|phase' -> n    jobs per feed and phase; 'F|records': records committed
--   <P>due_feeds        zset, ms               feeds with an idle job: the earliest next_due_ms
--   <P>feeds            set                    feeds with registered jobs
-- A paused job is in no phase index. A retired job (its feed or partition
-- left the config) keeps its hash and is in no index at all, but for a
-- retired child job or batch slot, which is in
--   <P>feed:F:retired   zset, score 0          retired child jobs and slots (lexicographic)
--
-- A cursor, an error text, a child's vars or a batch slot's batch longer than LONG bytes is kept beside the hash
-- in '<hash>:<field>', never in it: one long value would turn the hash from
-- Redis's compact listpack (about 300 bytes a job) into a hashtable (about
-- 1,000) for good, even after the value is gone. put/drop/value know this;
-- nothing else writes or reads those four fields.
local P = ARGV[1]
local RUNNING, COUNTS, DUE_FEEDS, FEEDS = P .. 'running', P .. 'counts', P .. 'due_feeds', P .. 'feeds'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function fmt(n) return string.format('%.0f', n) end

local LONG = 64

-- An idle job due at NEVER (a child job that has run: only its parent makes
-- it due again) is in no due index. tidemark_core::checkpoint::NEVER_DUE_MS.
local NEVER = 9007199254740991

local function side(j, field) return j.hash .. ':' .. field end

local function put(j, field, v)
  if #v > LONG then
    redis.call('SET', side(j, field), v)
    redis.call('HDEL', j.hash, field)
  else
    redis.call('HSET', j.hash, field, v)
    redis.call('DEL', side(j, field))
  end
end

local function drop(j, field)
  redis.call('HDEL', j.hash, field)
  redis.call('DEL', side(j, field))
end

local function value(j, field)
  local v = redis.call('HGET', j.hash, field)
  if v then return v end
  return redis.call('GET', side(j, field))
end

-- The whole job as field, value, ...: the hash and the values beside it.
local function whole(j)
  local h = redis.call('HGETALL', j.hash)
  if #h == 0 then return h end
  for _, field in ipairs({'cursor', 'last_error', 'vars', 'batch'}) do
    local v = redis.call('GET', side(j, field))
    if v then h[#h + 1] = field; h[#h + 1] = v end
  end
  return h
end

-- Rewrite a hash that a long value turned into a hashtable (a job of an
-- earlier layout, or one created with a long cursor), its long values set
-- aside: the new hash is compact again.
local function compact(j)
  if redis.call('OBJECT', 'ENCODING', j.hash) ~= 'hashtable' then return end
  local h = redis.call('HGETALL', j.hash)
  local keep = {}
  for i = 1, #h, 2 do
    local f, v = h[i], h[i + 1]
    if (f == 'cursor' or f == 'last_error' or f == 'vars' or f == 'batch') and #v > LONG then
      redis.call('SET', side(j, f), v)
    else
      keep[#keep + 1] = f
      keep[#keep + 1] = v
    end
  end
  redis.call('DEL', j.hash)
  if #keep > 0 then redis.call('HSET', j.hash, unpack(keep)) end
end

local function ctx(feed, member)
  local f = P .. 'feed:' .. feed .. ':'
  return { feed = feed, member = member, global = feed .. ':' .. member,
    hash = P .. 'job:' .. feed .. ':' .. member, jobs = f .. 'jobs', due = f .. 'due',
    failed = f .. 'failed', progress = f .. 'progress', hw = f .. 'hw', retired = f .. 'retired' }
end

local function registered(j) return redis.call('ZSCORE', j.jobs, j.member) ~= false end

local function count(j, phase, by)
  local field = j.feed .. '|' .. phase
  if redis.call('HINCRBY', COUNTS, field, by) <= 0 then redis.call('HDEL', COUNTS, field) end
end

local function add_records(j, n)
  if n ~= 0 then redis.call('HINCRBY', COUNTS, j.feed .. '|records', n) end
end

-- due_feeds holds the feed's earliest due time, or not the feed at all.
local function refresh_due_feed(j)
  local first = redis.call('ZRANGE', j.due, 0, 0, 'WITHSCORES')
  if #first == 0 then redis.call('ZREM', DUE_FEEDS, j.feed)
  else redis.call('ZADD', DUE_FEEDS, first[2], j.feed) end
end

local function leave(j, phase)
  count(j, phase, -1)
  redis.call('ZREM', RUNNING, j.global)
  redis.call('ZREM', j.failed, j.member)
  if redis.call('ZREM', j.due, j.member) == 1 then refresh_due_feed(j) end
end

-- due: an idle job's next_due_ms; deadline: a running chain's lease deadline.
local function enter(j, phase, due, deadline, now)
  count(j, phase, 1)
  if phase == 'idle' then
    if due < NEVER then
      redis.call('ZADD', j.due, fmt(due), j.member)
      refresh_due_feed(j)
    end
  elseif phase == 'running' then
    redis.call('ZADD', RUNNING, fmt(deadline), j.global)
  elseif phase == 'failed' then
    redis.call('ZADD', j.failed, fmt(now), j.member)
  end
end

-- A registered job changes phase (the caller writes the hash).
local function move(j, from, to, due, deadline, now)
  if not registered(j) then return end
  leave(j, from or 'idle')
  enter(j, to, due, deadline, now)
end

-- A running chain's new deadline.
local function extend(j, deadline)
  if registered(j) then redis.call('ZADD', RUNNING, fmt(deadline), j.global) end
end

-- A batch slot (idle, without a batch) claims up to `size` of the parents
-- pending in `pending`, oldest first: true when it got any.
local function claim(slot, pending, size)
  local got = redis.call('ZPOPMIN', pending, size)
  if #got == 0 then return false end
  local ids = {}
  for k = 1, #got, 2 do ids[#ids + 1] = got[k] end
  put(slot, 'batch', cjson.encode(ids))
  return true
end

-- Register a job whose hash exists, by what the hash says: 1 when it joined,
-- 0 when it was registered already.
local function join(j, now)
  if registered(j) then return 0 end
  redis.call('ZREM', j.retired, j.member)
  compact(j)
  local f = redis.call('HMGET', j.hash, 'phase', 'next_due_ms', 'lease_until_ms', 'last_commit_ms', 'records', 'pv', 'bsize')
  redis.call('ZADD', j.jobs, 0, j.member)
  add_records(j, tonumber(f[5]) or 0)
  redis.call('SADD', FEEDS, j.feed)
  enter(j, f[1] or 'idle', tonumber(f[2]) or 0, tonumber(f[3]) or 0, now)
  if not f[6] and not f[7] then redis.call('ZADD', j.progress, fmt(tonumber(f[4]) or now), j.member) end
  return 1
end

