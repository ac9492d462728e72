-- Write queue settings (meta) and wake idle workers, since a setting may let them fetch again.
-- KEYS[1] B:meta   ARGV[1] B   ARGV[2] n fields to set, then field/value pairs, then fields to
-- delete. Pausing and resuming go through here too (field 'paused').
local B = ARGV[1]
local n = tonumber(ARGV[2])
local mk = B .. ':meta'
local i = 3
local sets = {}
for _ = 1, n do
  sets[#sets + 1] = ARGV[i]
  sets[#sets + 1] = ARGV[i + 1]
  i = i + 2
end
if #sets > 0 then rcall('HSET', mk, unpack(sets)) end
for k = i, #ARGV do rcall('HDEL', mk, ARGV[k]) end
local M = meta_of(B)
for k = 1, #sets, 2 do
  if sets[k] == 'paused' then
    if sets[k + 1] == '1' then emit(B, M, 'e', 'paused') else emit(B, M, 'e', 'resumed') end
  end
end
local now = now_ms()
if not M.paused then
  wake(B, M)
  poke(B)  -- idle workers re-read limits and timeouts
end
flush_wakes(now)
return 1
