-- registry: store the feed registry document when it changed.
-- KEYS[1] the registry hash
-- ARGV[1] the document's digest   ARGV[2] the document (JSON; secrets as ${VAR} references)
-- Returns the version in force: unchanged when the digest matches, else one more.
local cur = redis.call('HGET', KEYS[1], 'sha')
if cur == ARGV[1] then return tonumber(redis.call('HGET', KEYS[1], 'version')) end
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'sha', ARGV[1], 'doc', ARGV[2])
return v
