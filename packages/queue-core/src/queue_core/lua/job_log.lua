-- Append a line to a job's log, keeping the newest `keep` lines.
-- KEYS[1] B:meta   ARGV[1] B   ARGV[2] job id   ARGV[3] line   ARGV[4] keep
-- Returns the number of lines kept, or 0 if the job is gone.
local B, id, keep = ARGV[1], ARGV[2], tonumber(ARGV[4])
if rcall('EXISTS', B .. ':j:' .. id) == 0 then return 0 end
local lk = B .. ':l:' .. id
local n = rcall('RPUSH', lk, ARGV[3])
if keep > 0 and n > keep then
  rcall('LTRIM', lk, -keep, -1)
  n = keep
end
return n
