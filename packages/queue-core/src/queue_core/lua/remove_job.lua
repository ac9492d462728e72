-- Remove one job from whatever state it is in.
-- KEYS[1] B:meta   ARGV[1] B   ARGV[2] job id   ARGV[3] force (1 = also an active job)
-- Returns 1 removed, 0 no such job, -1 active and not forced.
local B, id, force = ARGV[1], ARGV[2], ARGV[3] == '1'
local jk = B .. ':j:' .. id
if rcall('EXISTS', jk) == 0 then return 0 end
local M = meta_of(B)
local f = fin_fields(jk)
local gid = f[F_GID]
if rcall('ZSCORE', B .. ':active', id) then
  if not force then return -1 end
  rcall('ZREM', B .. ':active', id)
  if gid then group_release(B, M, gid, 0) end
end
if rcall('ZREM', B .. ':wait', id) == 0 and gid then
  if rcall('LREM', B .. ':g:' .. gid, 1, id) > 0 then
    rcall('DECR', B .. ':gw')
    group_sync(B, M, gid)
  end
end
rcall('ZREM', B .. ':delayed', id)
rcall('ZREM', B .. ':completed', id)
rcall('ZREM', B .. ':failed', id)
rcall('ZREM', B .. ':wc', id)
if f[F_DDK] then
  local dk = B .. ':de:' .. f[F_DDK]
  if rcall('GET', dk) == id then rcall('DEL', dk) end
end
if f[F_PID] then
  parent_child_done(f[F_PB], f[F_PID], B .. '|' .. id, 'null', false, f[F_PFP], now_ms(), {})
end
delete_job_keys(B, id)
rcall('DEL', B .. ':deps:' .. id, B .. ':cres:' .. id, B .. ':cfail:' .. id)
emit(B, M, 'e', 'removed', 'id', id)
flush_wakes(now_ms())
return 1
