-- Add one or more jobs atomically (one round trip for a bulk).
-- KEYS[1]  B:meta (routing only)
-- ARGV[1]  B, the queue's key base
-- ARGV[2]  number of jobs
-- then per job, 12 fixed values and its hash fields:
--   id ('' = auto), prio, delay ms, ready_at ms (absolute, 0 = none), lifo (0/1), group id,
--   group weight, group max size (0 = none), dedup id, dedup ttl ms, dedup mode, n fields,
--   then n values (field, value, field, value, ...)
-- Returns per job: id, status (1 added, 0 duplicate id, 2 deduplicated, -1 group full), extra
-- (the stored hash for a duplicate id, else '').
local B = ARGV[1]
local n = tonumber(ARGV[2])
local now = now_ms()
local M = meta_of(B)
local out = {}
local i = 3
for _ = 1, n do
  local nf = tonumber(ARGV[i + 11])
  local fields = {}
  for k = 1, nf do fields[k] = ARGV[i + 11 + k] end
  local delay = tonumber(ARGV[i + 2])
  local ready_at = tonumber(ARGV[i + 3])
  if ready_at <= 0 and delay > 0 then ready_at = now + delay end
  local r = add_one(B, M, now, {
    id = ARGV[i], prio = tonumber(ARGV[i + 1]), ready_at = ready_at, lifo = ARGV[i + 4] == '1',
    gid = ARGV[i + 5], weight = tonumber(ARGV[i + 6]), gmax = tonumber(ARGV[i + 7]),
    ddid = ARGV[i + 8], ddttl = tonumber(ARGV[i + 9]), ddmode = ARGV[i + 10], fields = fields,
  })
  out[#out + 1] = r[1]
  out[#out + 1] = r[2]
  out[#out + 1] = r[3]
  i = i + 12 + nf
end
return out
