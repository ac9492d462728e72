-- Recover jobs whose lease expired (their worker died or lost Redis): back to the front of the
-- queue, or failed after too many stalls. At most one sweep runs per interval, whoever calls.
-- KEYS[1]  B:meta (routing only)
-- ARGV[1]  B
-- ARGV[2]  sweep interval ms (throttle)
-- ARGV[3]  max stalled count (a job that stalls more often fails)
-- ARGV[4]  max jobs per sweep
-- Returns {swept (0/1), requeued ids, failed ids, ms until the next sweep is allowed (when
-- another worker swept within the interval; 0 otherwise)}.
local B = ARGV[1]
if not rcall('SET', B .. ':stall', '1', 'NX', 'PX', tonumber(ARGV[2])) then
  return { 0, {}, {}, math.max(0, rcall('PTTL', B .. ':stall')) }
end
local max_stalled = tonumber(ARGV[3])
local now = now_ms()
local M = meta_of(B)
local ak = B .. ':active'
local expired = rcall('ZRANGEBYSCORE', ak, '-inf', now, 'LIMIT', 0, tonumber(ARGV[4]))
local requeued, failed = {}, {}
local trims = {}
for _, id in ipairs(expired) do
  rcall('ZREM', ak, id)
  local jk = B .. ':j:' .. id
  local tok = rcall('HGET', jk, 'tok')
  if tok then
    local stc = rcall('HINCRBY', jk, 'stc', 1)
    -- 's' marks the old lease as taken away: its worker's late finish is reported as lost.
    rcall('HSET', jk, 'tok', 's' .. tok)
    local f = fin_fields(jk)
    emit(B, M, 'e', 'stalled', 'id', id, 'stc', stc)
    if stc > max_stalled and not f[F_SCH] then
      local err = 'job stalled more than allowable limit'
      rcall('HSET', jk, 'fon', now, 'err', err)
      emit(B, M, 'e', 'failed', 'id', id, 'err', err)
      finalize(B, M, id, f, true, now, trims, err)
      if f[F_GID] then group_release(B, M, f[F_GID], 0) end
      failed[#failed + 1] = id
    else
      requeue_front(B, M, id, f)
      emit(B, M, 'e', 'waiting', 'id', id, 'prev', 'stalled')
      requeued[#requeued + 1] = id
    end
  end
end
apply_trims(trims, now)
repair_schedulers(B, M, now)
flush_wakes(now)
return { 1, requeued, failed, 0 }
