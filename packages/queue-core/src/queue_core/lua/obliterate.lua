-- Delete a paused queue with all its jobs, in batches; call until it returns 1.
-- KEYS[1] B:meta   ARGV[1] B   ARGV[2] force (delete even with active jobs)   ARGV[3] batch
-- Returns 1 when everything is gone, 0 when more batches are needed; errors when the queue is
-- not paused, or has active jobs and force is off.
local B, force, batch = ARGV[1], ARGV[2] == '1', tonumber(ARGV[3])
if rcall('HGET', B .. ':meta', 'paused') ~= '1' then
  return redis.error_reply('ERR obliterate: pause the queue first')
end
if not force and rcall('ZCARD', B .. ':active') > 0 then
  return redis.error_reply('ERR obliterate: the queue has active jobs (use force)')
end
local budget = batch
local function drop_set(name)
  local sk = B .. ':' .. name
  while budget > 0 do
    local ids = rcall('ZRANGE', sk, 0, math.min(budget, 500) - 1)
    if #ids == 0 then return true end
    for _, id in ipairs(ids) do
      delete_job_keys(B, id)
      rcall('DEL', B .. ':deps:' .. id, B .. ':cres:' .. id, B .. ':cfail:' .. id)
    end
    rcall('ZREM', sk, unpack(ids))
    budget = budget - #ids
  end
  return rcall('ZCARD', sk) == 0
end
for _, name in ipairs({ 'active', 'wait', 'delayed', 'completed', 'failed', 'wc' }) do
  if not drop_set(name) then return 0 end
end
while budget > 0 do
  local groups = rcall('ZRANGE', B .. ':groups', 0, 99)
  if #groups == 0 then break end
  for _, gid in ipairs(groups) do
    local gl = B .. ':g:' .. gid
    for _, id in ipairs(rcall('LRANGE', gl, 0, -1)) do delete_job_keys(B, id) end
    budget = budget - rcall('LLEN', gl)
    rcall('DEL', gl, B .. ':gm:' .. gid, B .. ':grl:' .. gid)
    rcall('ZREM', B .. ':groups', gid)
  end
end
if rcall('ZCARD', B .. ':groups') > 0 then return 0 end
for _, lv in ipairs(rcall('ZRANGE', B .. ':gprios', 0, -1)) do rcall('DEL', B .. ':gready:' .. lv) end
for _, sid in ipairs(rcall('ZRANGE', B .. ':sched', 0, -1)) do rcall('DEL', B .. ':sch:' .. sid) end
rcall('DEL', B .. ':meta', B .. ':ctr', B .. ':pseq', B .. ':idle', B .. ':events',
  B .. ':limiter', B .. ':qhold', B .. ':stall', B .. ':metrics', B .. ':groups', B .. ':gprios', B .. ':gheld',
  B .. ':gclock', B .. ':gw', B .. ':fseq', B .. ':sched', B .. ':wait', B .. ':active', B .. ':delayed',
  B .. ':completed', B .. ':failed', B .. ':wc')
return 1
