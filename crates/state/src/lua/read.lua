-- read: whole jobs, each as its hash and the long values kept beside it
-- (index.lua's put).
-- ARGV[2 ..]: feed, member, feed, member, ...
-- Returns one field, value, ... list per job (empty when it does not exist).
local out = {}
for i = 2, #ARGV, 2 do
  out[#out + 1] = whole(ctx(ARGV[i], ARGV[i + 1]))
end
return out
