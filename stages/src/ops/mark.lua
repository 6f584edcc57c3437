-- Inside the transaction replaying a large dead letter, before its XADD (see dlq.rs): records
-- the target's length in the marker key.
-- KEYS: target, marker.
redis.call('SET', KEYS[2], redis.call('XLEN', KEYS[1]), 'PX', 60000)
return 1
