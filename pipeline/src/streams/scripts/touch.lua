-- Resets the idle time of the entries a consumer owns within ID ranges (XCLAIM … JUSTID, which
-- does not count a delivery); see `Consumer::touch` in group.rs.
-- KEYS: stream. ARGV: group, consumer, then pairs of (first ID, last ID).
-- Replies how many entries were touched.
local n = 0
for i = 3, #ARGV, 2 do
  local start = ARGV[i]
  while true do
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], start, ARGV[i + 1], 4000, ARGV[2])
    if #p == 0 then break end
    local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
    for _, e in ipairs(p) do args[#args + 1] = e[1] end
    args[#args + 1] = 'JUSTID'
    redis.call(unpack(args))
    n = n + #p
    if #p < 4000 then break end
    start = '(' .. p[#p][1]
  end
end
return n
