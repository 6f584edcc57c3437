-- Trims a stream up to the oldest entry some group still needs: its oldest pending entry, or,
-- with nothing pending, its last delivered one (entries after it are not yet delivered). A
-- stream without groups is left alone. See `trim_acknowledged` in group.rs.
-- KEYS: stream. Replies the number of entries removed.
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if not ok or #groups == 0 then return 0 end
local function less(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local min = nil
for _, g in ipairs(groups) do
  local name, pending, last
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1]
    elseif g[i] == 'pending' then pending = g[i + 1]
    elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
  end
  local keep = last
  if pending > 0 then keep = redis.call('XPENDING', KEYS[1], name)[2] end
  if min == nil or less(keep, min) then min = keep end
end
return redis.call('XTRIM', KEYS[1], 'MINID', min)
