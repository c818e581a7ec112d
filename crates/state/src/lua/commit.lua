-- commit: apply one page's commit if it chains; check everything, then write.
-- ARGV[2]  feed             ARGV[3]  member
-- ARGV[4]  epoch            ARGV[5]  expected_seq
-- ARGV[6]  has_cursor 0/1   ARGV[7]  new_cursor
-- ARGV[8]  new_seq          ARGV[9]  has_high_water 0/1   ARGV[10] high_water (normalised)
-- ARGV[11] record count     ARGV[12] end_of_stream 0/1    ARGV[13] next_due_ms
-- ARGV[14] lease_ms (the chain's deadline from now while its next task waits)
-- ARGV[15] restart 0/1 (with end_of_stream: the next chain starts from a start point)
-- ARGV[16] restart stage     ARGV[17] has_start_from 0/1    ARGV[18] start_from
-- ARGV[19] the page's high-water mark as unix ms, or '' when it is not a time
-- ARGV[20] with end_of_stream: a note kept as last_error, or ''
-- ARGV[21] n: the child jobs the page's records trigger, then per each (5n
--   values): child feed, member, partition, parent version, vars (JSON);
--   applied as tidemark_core's Trigger::apply specifies, in this same step.
-- Then per batched child feed (tidemark_core's BatchTriggers): feed, tenant
--   (or ''), size, the number of slots, per slot: member, partition; the
--   number of parents, per parent: child partition, parent version.
-- Returns OK | ALREADY_APPLIED | FENCED | CONFLICT (same as Checkpoint::apply in tidemark-core).
local J = ctx(ARGV[2], ARGV[3])

-- A batched child feed's keys: its parents pending (per tenant, '' for
-- none) and the size and slot count its parent's last commit gave.
local function pending_key(feed, tenant) return P .. 'feed:' .. feed .. ':pending:' .. tenant end
local function batch_key(feed) return P .. 'feed:' .. feed .. ':batch' end
-- A batch slot's tenant ('' for none) and index, from its partition
-- (tidemark_core::child::batch_slot makes it, split_batch_slot reads it).
local function slot_of(partition)
  local tenant, index = string.match(partition or '', '^(.-)/?batch%-(%d+)$')
  return tenant, tonumber(index)
end
local h = J.hash
if redis.call('EXISTS', h) == 0 then return 'FENCED' end
local f = redis.call('HMGET', h, 'epoch', 'seq', 'cursor', 'phase', 'high_water', 'pv', 'bsize')
f[3] = value(J, 'cursor')
local seq = tonumber(f[2]) or 0
local expected = tonumber(ARGV[5])
local new_seq = tonumber(ARGV[8])
local new_cursor = false
if ARGV[6] == '1' then new_cursor = ARGV[7] end
local restart = ARGV[12] == '1' and ARGV[15] == '1'
if restart then new_cursor = false end

if f[1] ~= ARGV[4] then return 'FENCED' end
if seq == new_seq and f[3] == new_cursor and new_seq == expected + 1 then return 'ALREADY_APPLIED' end
if f[4] ~= 'running' then return 'FENCED' end
if seq ~= expected or new_seq ~= expected + 1 then return 'CONFLICT' end

-- Checked; now write.
local now = now_ms()
if new_cursor then put(J, 'cursor', new_cursor) else drop(J, 'cursor') end
redis.call('HSET', h, 'seq', ARGV[8])
if ARGV[9] == '1' then
  local old = f[5]
  local greater = true
  if old then
    local x, y = tonumber(ARGV[10]), tonumber(old)
    if x and y then greater = x > y else greater = ARGV[10] > old end
  end
  if greater then redis.call('HSET', h, 'high_water', ARGV[10]) end
end
redis.call('HINCRBY', h, 'pages', 1)
redis.call('HINCRBY', h, 'records', tonumber(ARGV[11]))
drop(J, 'last_error')
redis.call('HSET', h, 'last_commit_ms', fmt(now))
if registered(J) then
  add_records(J, tonumber(ARGV[11]))
  if not f[6] and not f[7] then
    redis.call('ZADD', J.progress, fmt(now), J.member)
    if ARGV[19] ~= '' then redis.call('ZADD', J.hw, 'GT', ARGV[19], J.member) end
  end
end
if ARGV[12] == '1' then
  local due = tonumber(ARGV[13])
  -- A child whose parent changed while this chain ran runs again now.
  if redis.call('HDEL', h, 'rerun') == 1 then due = now end
  -- A batch slot's batch is done: it claims the next, if any is pending.
  -- The feed's batch size and slot count as its parent's last commit gave
  -- them (the config in force); a slot beyond the count claims no more.
  local bsize = redis.call('HGET', h, 'bsize')
  if bsize then
    drop(J, 'batch')
    local conf = redis.call('HMGET', batch_key(J.feed), 'size', 'slots')
    local tenant, index = slot_of(redis.call('HGET', h, 'partition'))
    local size = tonumber(conf[1]) or tonumber(bsize)
    if index and index < (tonumber(conf[2]) or 1) and claim(J, pending_key(J.feed, tenant), size) then
      due = now
    end
  end
  redis.call('HSET', h, 'phase', 'idle', 'lease_until_ms', '0', 'last_eos_ms', fmt(now),
    'next_due_ms', fmt(due))
  if ARGV[20] ~= '' then put(J, 'last_error', ARGV[20]) end
  if restart then
    redis.call('HSET', h, 'stage', ARGV[16])
    if ARGV[17] == '1' then redis.call('HSET', h, 'start_from', ARGV[18]) else redis.call('HDEL', h, 'start_from') end
  end
  move(J, 'running', 'idle', due, 0, now)
else
  local deadline = now + tonumber(ARGV[14])
  redis.call('HSET', h, 'lease_until_ms', fmt(deadline))
  extend(J, deadline)
end

-- The child jobs of this page's records. A rewind of this job changed its
-- generation, so records read again differ from what their children saw.
local gen = redis.call('HGET', h, 'gen')
-- The version a child stores for a parent record's version (Rust's trigger_version).
local function versioned(v)
  if gen and gen ~= '0' then return gen .. '|' .. v end
  return v
end
local plain = tonumber(ARGV[21]) or 0
for i = 22, 21 + 5 * plain, 5 do
  local c = ctx(ARGV[i], ARGV[i + 1])
  local pv = versioned(ARGV[i + 3])
  if redis.call('EXISTS', c.hash) == 0 then
    redis.call('HSET', c.hash, 'feed', ARGV[i], 'partition', ARGV[i + 2], 'phase', 'idle',
      'next_due_ms', fmt(now), 'pv', pv)
    put(c, 'vars', ARGV[i + 4])
  else
    local cf = redis.call('HMGET', c.hash, 'pv', 'phase')
    if cf[1] ~= pv then
      redis.call('HSET', c.hash, 'pv', pv)
      put(c, 'vars', ARGV[i + 4])
      local phase = cf[2] or 'idle'
      if phase == 'idle' then
        redis.call('HSET', c.hash, 'next_due_ms', fmt(now))
        move(c, 'idle', 'idle', now, 0, now)
      elseif phase == 'running' or phase == 'paused' then
        redis.call('HSET', c.hash, 'rerun', '1')
      end
    end
  end
  -- A child retired with its feed comes back when its parent is read.
  join(c, now)
end

-- Batched child feeds: changed parents wait in the feed's pending set (per
-- tenant) until an idle slot without a batch claims them.
local i = 22 + 5 * plain
while i <= #ARGV do
  local feed, tenant, size, nslots = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local slots = i + 4
  local np = tonumber(ARGV[slots + 2 * nslots])
  local first = slots + 2 * nslots + 1
  local pvs = P .. 'feed:' .. feed .. ':pv'
  local pend = pending_key(feed, tenant)
  redis.call('HSET', batch_key(feed), 'size', fmt(size), 'slots', fmt(nslots))
  for k = first, first + 2 * np - 1, 2 do
    local pv = versioned(ARGV[k + 1])
    if redis.call('HGET', pvs, ARGV[k]) ~= pv then
      redis.call('HSET', pvs, ARGV[k], pv)
      redis.call('ZADD', pend, 'NX', fmt(now), ARGV[k])
    end
  end
  for k = slots, slots + 2 * nslots - 1, 2 do
    local s = ctx(feed, ARGV[k])
    local exists = redis.call('EXISTS', s.hash) == 1
    -- A slot retired with its tenant (its batch kept) comes back.
    if exists then join(s, now) end
    if redis.call('ZCARD', pend) > 0 then
      if not exists then
        redis.call('HSET', s.hash, 'feed', feed, 'partition', ARGV[k + 1], 'phase', 'idle',
          'next_due_ms', fmt(NEVER), 'bsize', fmt(size))
        join(s, now)
      end
      if redis.call('HGET', s.hash, 'phase') == 'idle' and not value(s, 'batch')
        and claim(s, pend, size) then
        redis.call('HSET', s.hash, 'next_due_ms', fmt(now))
        move(s, 'idle', 'idle', now, 0, now)
      end
    end
  end
  i = first + 2 * np
end
return 'OK'
