-- Advance a scheduler from the run that just started to the next one (compare-and-set).
-- KEYS[1] B:meta   ARGV[1] B   ARGV[2] scheduler id   ARGV[3] run that started (ms)
-- ARGV[4] next run (ms; 0 = the schedule has ended)
-- Only the first caller for a given run advances (the scheduler's `next` must still equal
-- it), so many workers with skewed clocks still leave exactly one pending job.
-- Returns 1 advanced, 0 someone else did (or the scheduler changed or was removed).
local B, sid, prev, nxt = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local hk = B .. ':sch:' .. sid
local f = rcall('HMGET', hk, 'next', 'limit', 'count')
if tonumber(f[1]) ~= prev then return 0 end
local count = (tonumber(f[3]) or 0) + 1
local limit = tonumber(f[2]) or 0
if limit > 0 and count >= limit then nxt = 0 end
local now = now_ms()
local M = meta_of(B)
rcall('HSET', hk, 'next', nxt, 'count', count)
if nxt > 0 then
  rcall('ZADD', B .. ':sched', nxt, sid)
  schedule_job(B, M, now, sid, nxt)
else
  rcall('ZREM', B .. ':sched', sid)
end
flush_wakes(now)
return 1
