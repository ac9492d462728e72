-- Renew the leases of a worker's jobs in one batch.
-- KEYS[1]  B:meta (routing only)
-- ARGV[1]  B
-- ARGV[2]  lease duration ms
-- ARGV[3..] job id, token pairs
-- Returns the ids whose lease this worker no longer holds.
local B = ARGV[1]
local untl = now_ms() + tonumber(ARGV[2])
local ak = B .. ':active'
local lost = {}
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  local tok = rcall('HGET', B .. ':j:' .. id, 'tok')
  if tok == ARGV[i + 1] then
    rcall('ZADD', ak, 'XX', untl, id)
  elseif tok ~= 'r' .. ARGV[i + 1] then
    -- (released with this very token means our own finish just landed: not lost)
    lost[#lost + 1] = id
  end
end
return lost
