-- Shared by strata's scripts. The first line (error codes and MAX_ARGS) is generated from the
-- constants in `streams::scripts`; see `scripts::script`.

-- An error reply whose code (its first word) Rust classifies.
local function refuse(code, msg)
  return redis.error_reply(code .. ' ' .. msg)
end

-- The text of an error caught by pcall (a string, or a table with `err` on newer Redis).
local function err_text(e)
  if type(e) == 'table' then return tostring(e.err or e.message or e) end
  return tostring(e)
end

-- The reply after undoing a failed write: the original error when its code is a transient one
-- (TRANSIENT, generated from Rust: OOM, BUSY, …), so the caller waits and retries; else `code`.
local function undone(code, e, note)
  local text = err_text(e)
  if TRANSIENT[string.match(text, '^(%S+)')] then
    return redis.error_reply(text .. ' (' .. note .. ')')
  end
  return refuse(code, text .. ' (' .. note .. ')')
end

-- nil when `key` is a stream or absent, else the refusal to return.
local function not_a_stream(key)
  local t = redis.call('TYPE', key)['ok']
  if t == 'stream' or t == 'none' then return nil end
  return refuse(E_WRONGTYPE, key .. ' is a ' .. t .. ', not a stream')
end

-- Whether `id` is a strict `<ms>-<seq>` stream ID, both parts within 64 bits.
local function valid_id(id)
  local function part(p)
    if p == nil or #p > 20 then return false end
    return #p < 20 or p <= '18446744073709551615'
  end
  local ms, seq = string.match(id, '^(%d+)%-(%d+)$')
  return part(ms) and part(seq)
end
