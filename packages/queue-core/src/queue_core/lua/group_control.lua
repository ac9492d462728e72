-- Per-group controls. KEYS[1] B:meta   ARGV[1] B   ARGV[2] op   ARGV[3] group id   ARGV[4..] args
--   pause                  no new job of the group starts (active ones finish); 1, or 0 if already
--   resume                 undo pause; 1, or 0 if it was not paused
--   concurrency n          per-group concurrency override (0 = back to the queue default)
--   limit max duration_ms  per-group rate limit override (0 0 = back to the default)
--   hold ms                hold the group for ms (as a processor's GroupRateLimitError does)
--   info                   {waiting, active, paused, held_until, concurrency, limit max, duration}
local B, op, gid = ARGV[1], ARGV[2], ARGV[3]
local M = meta_of(B)
local gm = B .. ':gm:' .. gid
local result = 1
if op == 'pause' then
  if rcall('HGET', gm, 'p') == '1' then return 0 end
  rcall('HSET', gm, 'p', '1')
  rcall('ZADD', B .. ':groups', 0, gid)
elseif op == 'resume' then
  if rcall('HGET', gm, 'p') ~= '1' then return 0 end
  rcall('HDEL', gm, 'p')
elseif op == 'concurrency' then
  local n = tonumber(ARGV[4])
  if n and n > 0 then rcall('HSET', gm, 'c', n); rcall('ZADD', B .. ':groups', 0, gid)
  else rcall('HDEL', gm, 'c') end
elseif op == 'limit' then
  local mx, dur = tonumber(ARGV[4]), tonumber(ARGV[5])
  if mx and mx > 0 and dur and dur > 0 then
    rcall('HSET', gm, 'lm', mx, 'ld', dur)
    rcall('ZADD', B .. ':groups', 0, gid)
  else
    rcall('HDEL', gm, 'lm', 'ld')
  end
elseif op == 'hold' then
  group_hold(B, M, gid, now_ms() + tonumber(ARGV[4]))
  flush_wakes(now_ms())
  return 1
elseif op == 'info' then
  local f = rcall('HMGET', gm, 'a', 'p', 'h', 'c', 'lm', 'ld')
  return { rcall('LLEN', B .. ':g:' .. gid), tonumber(f[1]) or 0, f[2] == '1' and 1 or 0,
    tonumber(f[3]) or 0, tonumber(f[4]) or M.gc, tonumber(f[5]) or M.grlm or 0,
    tonumber(f[6]) or M.grld or 0 }
else
  return redis.error_reply('ERR group_control: unknown op ' .. op)
end
if group_sync(B, M, gid) then wake(B, M) end
flush_wakes(now_ms())
return result
