-- Remove a job scheduler and its pending (not yet started) job.
-- KEYS[1] B:meta   ARGV[1] B   ARGV[2] scheduler id.  Returns 1 removed, 0 unknown.
local B, sid = ARGV[1], ARGV[2]
local hk = B .. ':sch:' .. sid
local nxt = tonumber(rcall('HGET', hk, 'next'))
if rcall('DEL', hk) == 0 then return 0 end
rcall('ZREM', B .. ':sched', sid)
if nxt and nxt > 0 then
  local oid = 'sch:' .. sid .. ':' .. string.format('%d', nxt)
  if rcall('ZREM', B .. ':delayed', oid) == 1 or rcall('ZREM', B .. ':wait', oid) == 1 then
    delete_job_keys(B, oid)
    emit(B, meta_of(B), 'e', 'removed', 'id', oid, 'reason', 'scheduler removed')
  end
end
return 1
