-- Inside the transaction, after the XADD (see dlq.rs): XDELs the dead letter ARGV[1] from
-- KEYS[3] only if the target (KEYS[1]) grew by exactly one entry since the marker (KEYS[2]) was
-- set, i.e. the XADD happened (a failed command does not stop a transaction).
local before = redis.call('GET', KEYS[2])
redis.call('DEL', KEYS[2])
if not before or redis.call('XLEN', KEYS[1]) ~= tonumber(before) + 1 then
  return refuse(E_ROLLBACK, 'nothing was added to ' .. KEYS[1] .. '; dead letter ' .. ARGV[1] .. ' kept')
end
return redis.call('XDEL', KEYS[3], ARGV[1])
