-- Apply a worker's finished jobs, then lease its next jobs: one round trip for both.
-- KEYS[1]  B:meta (routing only)
-- ARGV[1]  B
-- ARGV[2]  worker token prefix (each lease token is "<prefix>:<attempts started>")
-- ARGV[3]  lease duration ms
-- ARGV[4]  number of jobs wanted (0 = finish only)
-- ARGV[5]  number of histogram values that follow (field, count pairs, flattened)
-- ARGV[6]  number of entries that follow the histogram
-- histogram: field, increment, ... (processing-time buckets, added to B:metrics)
-- entries: job id, lease token, kind, n, then n values:
--   c  completed       rv (JSON), attempts made
--   f  failed (final)  error, stack, error history (JSON), attempts made
--   r  retry           error, stack, error history (JSON), attempts made, delay ms
--   l  return unused   delay ms, scope ('' front of its queue | 'q' queue limited for delay |
--                      'g' group limited for delay | 'd' delayed by delay)
-- Returns {codes, jobs, next_in, rl_ttl, maxed}: codes has per entry 1 applied, 0 already
-- applied (a replay), -1 lease lost; jobs is id, token, hash triples; next_in is ms until the
-- next delayed job or group hold ends (-1 none) when fewer jobs than wanted were leased.
local B = ARGV[1]
local tokpfx = ARGV[2]
local lease = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local nh = tonumber(ARGV[5])
local ne = tonumber(ARGV[6])
local now = now_ms()
local M = meta_of(B)
local i = 7
local mk = B .. ':metrics'
for _ = 1, nh, 2 do
  rcall('HINCRBY', mk, ARGV[i], ARGV[i + 1])
  i = i + 2
end
local codes = {}
local trims = {}
local ncomp, nfail = 0, 0
local ak = B .. ':active'
for e = 1, ne do
  local id, tok, kind, na = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local a = i + 4
  i = i + 4 + na
  local jk = B .. ':j:' .. id
  local cur = rcall('HGET', jk, 'tok')
  if cur ~= tok then
    if cur == 'r' .. tok then codes[e] = 0 else codes[e] = -1 end
  else
    codes[e] = 1
    rcall('ZREM', ak, id)
    local f = fin_fields(jk)
    local gid = f[F_GID]
    if kind == 'c' then
      rcall('HSET', jk, 'tok', 'r' .. tok, 'fon', now, 'rv', ARGV[a], 'atm', ARGV[a + 1])
      emit(B, M, 'e', 'completed', 'id', id, 'rv', ARGV[a])
      finalize(B, M, id, f, false, now, trims, ARGV[a])
      if gid then group_release(B, M, gid, 0) end
      ncomp = ncomp + 1
    elseif kind == 'f' then
      rcall('HSET', jk, 'tok', 'r' .. tok, 'fon', now, 'err', ARGV[a], 'stack', ARGV[a + 1],
        'errs', ARGV[a + 2], 'atm', ARGV[a + 3])
      emit(B, M, 'e', 'failed', 'id', id, 'err', ARGV[a], 'atm', ARGV[a + 3])
      finalize(B, M, id, f, true, now, trims, ARGV[a])
      if gid then group_release(B, M, gid, 0) end
      nfail = nfail + 1
    elseif kind == 'r' then
      local delay = tonumber(ARGV[a + 4])
      rcall('HSET', jk, 'tok', 'r' .. tok, 'err', ARGV[a], 'stack', ARGV[a + 1],
        'errs', ARGV[a + 2], 'atm', ARGV[a + 3])
      emit(B, M, 'e', 'retrying', 'id', id, 'err', ARGV[a], 'atm', ARGV[a + 3], 'delay', delay)
      if gid and M.strict then
        -- Strict order: the job keeps the head of its group; the group waits out the backoff.
        rcall('LPUSH', B .. ':g:' .. gid, id)
        rcall('INCR', B .. ':gw')
        local hold = 0
        if delay > 0 then hold = now + delay end
        group_release(B, M, gid, hold)
      elseif delay > 0 then
        if gid then group_release(B, M, gid, 0) end
        rcall('HSET', jk, 'rdy', now + delay)
        place_delayed(B, id, now + delay)
      else
        if gid then group_release(B, M, gid, 0) end
        place_waiting(B, M, id, tonumber(f[F_PRIO]) or 0, gid, tonumber(f[F_SEQ]) or 0, false, 'tail')
      end
    else -- 'l'
      local delay = tonumber(ARGV[a]) or 0
      local scope = ARGV[a + 1]
      rcall('HSET', jk, 'tok', 'r' .. tok)
      if scope == 'q' and delay > 0 then
        rcall('SET', B .. ':limiter', 1000000000, 'PX', delay)
      end
      if scope == 'd' and delay > 0 then
        if gid then group_release(B, M, gid, 0) end
        rcall('HSET', jk, 'rdy', now + delay)
        place_delayed(B, id, now + delay)
        emit(B, M, 'e', 'delayed', 'id', id, 'at', now + delay)
      elseif gid then
        rcall('LPUSH', B .. ':g:' .. gid, id)
        rcall('INCR', B .. ':gw')
        local hold = 0
        if scope == 'g' and delay > 0 then hold = now + delay end
        group_release(B, M, gid, hold)
        emit(B, M, 'e', 'waiting', 'id', id, 'prev', 'active')
      else
        rcall('ZADD', B .. ':wait', front_score(tonumber(f[F_PRIO]) or 0, tonumber(f[F_SEQ]) or 0), id)
        if not M.paused then wake(B) end
        emit(B, M, 'e', 'waiting', 'id', id, 'prev', 'active')
      end
    end
  end
end
apply_trims(trims, now)
if ncomp + nfail > 0 then
  local minute = math.floor(now / 60000)
  if ncomp > 0 and rcall('HINCRBY', mk, 'c:' .. minute, ncomp) == ncomp then
    rcall('HDEL', mk, 'c:' .. (minute - 10080))
  end
  if nfail > 0 and rcall('HINCRBY', mk, 'f:' .. minute, nfail) == nfail then
    rcall('HDEL', mk, 'f:' .. (minute - 10080))
  end
  if rcall('ZCARD', ak) == 0 and rcall('ZCARD', B .. ':wait') == 0
      and (tonumber(rcall('GET', B .. ':gw')) or 0) <= 0 then
    emit(B, M, 'e', 'drained')
  end
end
local jobs = {}
local status = {}
fetch(B, M, now, want, tokpfx, now + lease, jobs, status)
local next_in = -1
if status.next_at then
  next_in = status.next_at - now
  if next_in < 0 then next_in = 0 end
end
return { codes, jobs, next_in, status.rl_ttl or 0, status.maxed and 1 or 0 }
