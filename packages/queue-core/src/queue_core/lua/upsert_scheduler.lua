-- Create or replace a job scheduler and make sure exactly one job is pending for it.
-- KEYS[1] B:meta   ARGV[1] B   ARGV[2] scheduler id   ARGV[3] spec (JSON, for reading back)
-- ARGV[4] job template (msgpack: the add-script job array without id and delay)
-- ARGV[5] first run (ms; 0 = never, the schedule has ended)   ARGV[6] run limit (0 = none)
-- The pending job's id is "sch:<scheduler id>:<run ms>", so concurrent upserts of the same
-- schedule converge on one job; a changed schedule replaces a pending job it no longer wants.
-- Returns the first run time.
local B, sid, first = ARGV[1], ARGV[2], tonumber(ARGV[5])
local now = now_ms()
local M = meta_of(B)
local hk = B .. ':sch:' .. sid
local old = tonumber(rcall('HGET', hk, 'next'))
rcall('HSET', hk, 'spec', ARGV[3], 'tmpl', ARGV[4], 'next', first, 'limit', tonumber(ARGV[6]))
if rcall('HEXISTS', hk, 'count') == 0 then rcall('HSET', hk, 'count', 0) end
if old and old ~= first then
  local oid = 'sch:' .. sid .. ':' .. string.format('%d', old)
  if rcall('ZREM', B .. ':delayed', oid) == 1 or rcall('ZREM', B .. ':wait', oid) == 1 then
    delete_job_keys(B, oid)
    emit(B, M, 'e', 'removed', 'id', oid, 'reason', 'rescheduled')
  end
end
if first > 0 then
  rcall('ZADD', B .. ':sched', first, sid)
  schedule_job(B, M, now, sid, first)
else
  rcall('ZREM', B .. ':sched', sid)
end
flush_wakes(now)
return first
