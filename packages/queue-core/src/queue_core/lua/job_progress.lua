-- Store a job's progress (JSON) and emit a `progress` event.
-- KEYS[1] B:meta   ARGV[1] B   ARGV[2] job id   ARGV[3] progress JSON.  Returns 1, or 0 if gone.
local B, id = ARGV[1], ARGV[2]
local jk = B .. ':j:' .. id
if rcall('EXISTS', jk) == 0 then return 0 end
rcall('HSET', jk, 'prog', ARGV[3])
emit(B, meta_of(B), 'e', 'progress', 'id', id, 'data', ARGV[3])
return 1
