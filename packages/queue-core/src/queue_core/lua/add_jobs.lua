-- Add one or more jobs atomically (one round trip for a bulk).
-- KEYS[1]  B:meta (routing only)
-- ARGV[1]  B, the queue's key base
-- ARGV[2]  msgpack array of jobs, each an array of:
--   id ('' = auto), prio, delay ms, ready_at ms (absolute, 0 = none), lifo (0/1), group id,
--   group weight, group max size (0 = none), dedup id, dedup ttl ms, dedup mode,
--   hash fields (array: field, value, field, value, ...)
-- (one blob instead of ~20 arguments per job: argument encoding dominated the client's cost)
-- Returns per job: id, status (1 added, 0 duplicate id, 2 deduplicated, -1 group full), extra
-- (the stored hash for a duplicate id, else '').
local B = ARGV[1]
local jobs = cmsgpack.unpack(ARGV[2])
local now = now_ms()
local M = meta_of(B)
local out = {}
-- Reserve the add counter and the wait positions for the whole batch at once.
local n = #jobs
M.seq_block = { next = rcall('INCRBY', B .. ':ctr', n) - n + 1, left = n }
M.pseq_block = { next = rcall('INCRBY', B .. ':pseq', n) - n + 1, left = n }
M.zbatch = {}
M.waiting_ids = {}
for _, a in ipairs(jobs) do
  local delay = a[3]
  local ready_at = a[4]
  if ready_at <= 0 and delay > 0 then ready_at = now + delay end
  local r = add_one(B, M, now, {
    id = a[1], prio = a[2], ready_at = ready_at, lifo = a[5] == 1, gid = a[6], weight = a[7],
    gmax = a[8], ddid = a[9], ddttl = a[10], ddmode = a[11], fields = a[12],
  })
  out[#out + 1] = r[1]
  out[#out + 1] = r[2]
  out[#out + 1] = r[3]
end
flush_zbatch(B, M)
-- One stream entry for all jobs that became waiting (ids are space-separated; job ids never
-- contain whitespace). QueueEvents turns it back into one event per job.
local w = M.waiting_ids
if #w == 1 then
  emit(B, M, 'e', 'waiting', 'id', w[1])
elseif #w > 1 then
  emit(B, M, 'e', 'waiting', 'ids', table.concat(w, ' '))
end
flush_wakes(now)
return out
