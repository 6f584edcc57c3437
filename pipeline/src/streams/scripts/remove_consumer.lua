-- Removes a consumer from its group only if it owns nothing: XGROUP DELCONSUMER drops the
-- consumer's pending entries, so the check and the removal are one atomic step.
-- KEYS: stream. ARGV: group, consumer.
-- Replies DELCONSUMER's count (0), or -1 when the consumer still owns entries.
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p == 0 then return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end
return -1
