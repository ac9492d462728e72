-- The state of one job, found by probing the structures (authoritative, not a stored field).
-- KEYS[1] B:meta   ARGV[1] B   ARGV[2] job id
-- Returns a JobState value, or 'missing'.
local B, id = ARGV[1], ARGV[2]
local jk = B .. ':j:' .. id
if rcall('EXISTS', jk) == 0 then return 'missing' end
if rcall('ZSCORE', B .. ':active', id) then return 'active' end
local s = rcall('ZSCORE', B .. ':wait', id)
if s then
  if math.floor(tonumber(s) / PB) > 0 then return 'prioritized' end
  return 'waiting'
end
if rcall('ZSCORE', B .. ':delayed', id) then return 'delayed' end
if rcall('ZSCORE', B .. ':completed', id) then return 'completed' end
if rcall('ZSCORE', B .. ':failed', id) then return 'failed' end
if rcall('ZSCORE', B .. ':wc', id) then return 'waiting-children' end
local gid = rcall('HGET', jk, 'gid')
if gid and rcall('LPOS', B .. ':g:' .. gid, id) then return 'waiting' end
local fon = rcall('HGET', jk, 'fon')
if fon and fon ~= '' then
  -- finished and kept without a set (count 0 deletes it, so this is a race with retention)
  if rcall('HGET', jk, 'err') then return 'failed' end
  return 'completed'
end
return 'unknown'
