-- Make delayed jobs startable now (earliest first), or only the listed ids.
-- KEYS[1] B:meta   ARGV[1] B   ARGV[2] max count   ARGV[3..] job ids (optional)
-- Returns the number of jobs promoted.
local B, count = ARGV[1], tonumber(ARGV[2])
local M = meta_of(B)
local dk = B .. ':delayed'
local ids = {}
if #ARGV > 2 then
  for k = 3, #ARGV do
    if rcall('ZSCORE', dk, ARGV[k]) then ids[#ids + 1] = ARGV[k] end
  end
else
  ids = rcall('ZRANGE', dk, 0, count - 1)
end
for _, id in ipairs(ids) do
  local f = rcall('HMGET', B .. ':j:' .. id, 'prio', 'gid', 'seq', 'lifo')
  rcall('ZREM', dk, id)
  rcall('HDEL', B .. ':j:' .. id, 'rdy')
  place_waiting(B, M, id, tonumber(f[1]) or 0, f[2], tonumber(f[3]) or 0, f[4] == '1', 'tail')
  emit(B, M, 'e', 'waiting', 'id', id, 'prev', 'delayed')
end
flush_wakes(now_ms())
return #ids
