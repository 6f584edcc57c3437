-- `strata dlq replay` of dead letters with few enough fields (see dlq.rs).
-- KEYS: the dead-letter stream, then the targets.
-- ARGV: a count, then per dead letter: its ID, the index of its target in KEYS, the number of
--       field pairs, and the pairs.
-- For each dead letter still in the dead-letter stream: XADD its fields to its target; then XDEL
-- all of them. Replies per dead letter the new ID, or 0 when it was already gone. All or
-- nothing: a refusal (E_LIMIT, E_WRONGTYPE) writes nothing, and after a failed write
-- (E_ROLLBACK) every entry added is deleted again and no dead letter is removed.
local count = tonumber(ARGV[1])
if count == nil then return refuse(E_LIMIT, 'malformed arguments: no count') end
if count + 2 > MAX_ARGS then
  return refuse(E_LIMIT, count .. ' dead letters in one step; at most ' .. (MAX_ARGS - 2))
end
for k = 1, #KEYS do
  local bad = not_a_stream(KEYS[k])
  if bad then return bad end
end

-- Checks, and which dead letters are still there; nothing is written before the end of this.
local out, todo, seen = {}, {}, {}
local i = 2
for e = 1, count do
  local id, t, np = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if id == nil or t == nil or t < 2 or KEYS[t] == nil or np == nil or np < 1 then
    return refuse(E_LIMIT, 'malformed arguments for dead letter ' .. tostring(id))
  end
  if 2 * np + 3 > MAX_ARGS then
    return refuse(E_LIMIT, 'dead letter ' .. id .. ' has ' .. np ..
      ' fields; one XADD from a script takes at most ' .. math.floor((MAX_ARGS - 3) / 2))
  end
  if not valid_id(id) then return refuse(E_LIMIT, 'invalid dead-letter ID ' .. id) end
  out[e] = 0
  if not seen[id] and #redis.call('XRANGE', KEYS[1], id, id) == 1 then
    seen[id] = true
    todo[#todo + 1] = {e, KEYS[t], i + 3, np, id}
  end
  i = i + 3 + 2 * np
end
if i ~= #ARGV + 1 then return refuse(E_LIMIT, 'malformed arguments: field counts do not add up') end

local added, ids = {}, {}
local ok, err = pcall(function()
  for _, w in ipairs(todo) do
    local new = redis.call('XADD', w[2], '*', unpack(ARGV, w[3], w[3] + 2 * w[4] - 1))
    added[#added + 1] = {w[2], new}
    out[w[1]] = new
    ids[#ids + 1] = w[5]
  end
  -- One XDEL checks every ID before deleting any.
  if #ids > 0 then redis.call('XDEL', KEYS[1], unpack(ids)) end
end)
if ok then return out end
for k = #added, 1, -1 do
  redis.call('XDEL', added[k][1], added[k][2])
end
return refuse(E_ROLLBACK, err_text(err) .. ' (' .. #added .. ' added entries deleted again)')
