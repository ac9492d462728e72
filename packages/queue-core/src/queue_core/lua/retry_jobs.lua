-- Move finished jobs back to waiting (oldest first), e.g. after fixing a bug.
-- KEYS[1] B:meta   ARGV[1] B   ARGV[2] state (failed|completed)   ARGV[3] max count
-- ARGV[4] reset attempts made (0/1). Returns the number of jobs moved.
local B, state, count, reset = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
if state ~= 'failed' and state ~= 'completed' then
  return redis.error_reply('ERR retry_jobs: state must be failed or completed')
end
local M = meta_of(B)
local sk = B .. ':' .. state
local ids = rcall('ZRANGE', sk, 0, count - 1)
for _, id in ipairs(ids) do
  local jk = B .. ':j:' .. id
  local f = rcall('HMGET', jk, 'prio', 'gid', 'seq', 'lifo')
  rcall('HDEL', jk, 'fon', 'rv', 'err', 'stack')
  if reset then rcall('HSET', jk, 'atm', 0, 'stc', 0) end
  place_waiting(B, M, id, tonumber(f[1]) or 0, f[2], tonumber(f[3]) or 0, f[4] == '1', 'tail')
  emit(B, M, 'e', 'waiting', 'id', id, 'prev', state)
end
if #ids > 0 then rcall('ZREM', sk, unpack(ids)) end
flush_wakes(now_ms())
return #ids
