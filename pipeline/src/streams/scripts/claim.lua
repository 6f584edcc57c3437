-- XAUTOCLAIM that records, in the same atomic step, whose entries it took (see
-- `Consumer::autoclaim` in group.rs).
-- KEYS: stream, claims hash.
-- ARGV: group, consumer, min idle ms, cursor, count.
-- Replies XAUTOCLAIM's reply, or E_WRONGTYPE (nothing claimed) when the claims key is not a hash.
local group, consumer = ARGV[1], ARGV[2]
local t = redis.call('TYPE', KEYS[2])['ok']
if t ~= 'hash' and t ~= 'none' then return refuse(E_WRONGTYPE, KEYS[2] .. ' is a ' .. t .. ', not a hash') end
local owner = {}
for _, e in ipairs(redis.call('XPENDING', KEYS[1], group, 'IDLE', ARGV[3], ARGV[4], '+', 10 * tonumber(ARGV[5]))) do
  owner[e[1]] = e[2]
end
local reply = redis.call('XAUTOCLAIM', KEYS[1], group, consumer, ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local taken = {}
for _, e in ipairs(reply[2]) do
  local from = type(e) == 'table' and owner[e[1]]
  if from then taken[from] = (taken[from] or 0) + 1 end
end
for from, n in pairs(taken) do
  redis.call('HINCRBY', KEYS[2], group .. ' ' .. from, n)
end
return reply
