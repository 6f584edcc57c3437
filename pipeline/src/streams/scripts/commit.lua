-- The atomic commit step of a stage (see `CommitStep` in streams/group.rs).
-- KEYS: input, output, dead-letter stream, claims hash.
-- ARGV: group, consumer, smallest ID, largest ID, n, verify ('1' or '0'), the n entry IDs,
--       then for the output and then the dead-letter stream: a count m, and m times
--       (number of field pairs, name, value, …).
-- Replies {} when done, the IDs another consumer owns now (nothing written), or an error whose
-- code is E_LIMIT or E_WRONGTYPE (refused, nothing written), E_ROLLBACK (a write failed; what
-- was added is deleted again, nothing acknowledged; a transient cause such as OOM keeps its own
-- code) or E_PARTIAL (an acknowledgement failed
-- after an earlier one succeeded; nothing removed).
local group, consumer = ARGV[1], ARGV[2]
local n, verify = tonumber(ARGV[5]), ARGV[6] == '1'
local first = 7
local last = first + n - 1

-- 1. Checks; nothing is written before they pass.
local outs = {KEYS[2], KEYS[3]}
local counts = {}
local i = last + 1
for l, key in ipairs(outs) do
  local m = tonumber(ARGV[i])
  if m == nil then return refuse(E_LIMIT, 'malformed arguments: no entry count for ' .. key) end
  i = i + 1
  for e = 1, m do
    local np = tonumber(ARGV[i])
    if np == nil or np < 1 then
      return refuse(E_LIMIT, 'entry ' .. e .. ' for ' .. key .. ' has no fields')
    end
    if 2 * np + 3 > MAX_ARGS then
      return refuse(E_LIMIT, 'entry ' .. e .. ' for ' .. key .. ' has ' .. np ..
        ' fields; one XADD from a script takes at most ' .. math.floor((MAX_ARGS - 3) / 2))
    end
    i = i + 1 + 2 * np
  end
  counts[l] = m
end
if i ~= #ARGV + 1 then return refuse(E_LIMIT, 'malformed arguments: field counts do not add up') end
local bad = not_a_stream(KEYS[1])
if bad then return bad end
for l, key in ipairs(outs) do
  if counts[l] > 0 then
    bad = not_a_stream(key)
    if bad then return bad end
  end
end
-- One XACK takes at most `chunk` IDs and checks them all before acknowledging any; with more
-- IDs than that, a later XACK must not fail after an earlier one, so every ID is checked here.
local chunk = MAX_ARGS - 3
if n > chunk then
  for k = first, last do
    if not valid_id(ARGV[k]) then return refuse(E_LIMIT, 'invalid entry ID ' .. ARGV[k]) end
  end
end

-- 2. Ownership. Entries move only through the claim script, which records the consumers it
-- took from in KEYS[4]; a consumer not recorded there still owns everything it read, so the
-- per-entry check runs only for consumers that lost entries, and for a retried step.
-- A step applied once and sent again (its reply lost: strata retries with verify, and a
-- cluster client resends a command on its own after a dropped connection, without it) finds
-- its smallest ID no longer pending: then every entry is checked too, and nothing is written
-- twice.
local check = verify or redis.call('HEXISTS', KEYS[4], group .. ' ' .. consumer) == 1
if n > 0 and not check then
  check = #redis.call('XPENDING', KEYS[1], group, ARGV[3], ARGV[3], 1, consumer) == 0
end
local lost = {}
if n > 0 and check then
  -- One range query for the batch (ARGV[3] and ARGV[4] are its smallest and largest ID);
  -- an ID it did not return (beyond the count, or moved) is checked on its own.
  local owned = {}
  for _, e in ipairs(redis.call('XPENDING', KEYS[1], group, ARGV[3], ARGV[4], 2 * n, consumer)) do
    owned[e[1]] = true
  end
  for k = first, last do
    local id = ARGV[k]
    if not owned[id] and #redis.call('XPENDING', KEYS[1], group, id, id, 1, consumer) == 0 then
      lost[#lost + 1] = id
    end
  end
end
if #lost > 0 then return lost end

-- 3. Writes: all of them, or (on any failure before the first acknowledgement) none.
local added = {}
local acked = false
local ok, err = pcall(function()
  local j = last + 1
  for l, key in ipairs(outs) do
    j = j + 1
    for _ = 1, counts[l] do
      local np = tonumber(ARGV[j])
      j = j + 1
      added[#added + 1] = {key, redis.call('XADD', key, '*', unpack(ARGV, j, j + 2 * np - 1))}
      j = j + 2 * np
    end
  end
  for k = first, last, chunk do
    redis.call('XACK', KEYS[1], group, unpack(ARGV, k, math.min(k + chunk - 1, last)))
    acked = true
  end
end)
if ok then return {} end
if acked then return refuse(E_PARTIAL, err_text(err)) end
for k = #added, 1, -1 do
  redis.call('XDEL', added[k][1], added[k][2])
end
return undone(E_ROLLBACK, err, #added .. ' added entries deleted again')
