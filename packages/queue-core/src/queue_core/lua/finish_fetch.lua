-- Apply a worker's finished jobs, then lease its next jobs: one round trip for both.
-- KEYS[1]  B:meta (routing only)
-- ARGV[1]  B
-- ARGV[2]  worker token prefix (each lease token is "<prefix>:<attempts started>")
-- ARGV[3]  lease duration ms
-- ARGV[4]  number of jobs wanted (0 = finish only)
-- ARGV[5]  ms the worker will wait for a handoff if it gets fewer jobs than wanted
-- ARGV[6]  msgpack array: field, increment, ... (processing-time histogram, into B:metrics)
-- ARGV[7]  msgpack array of entries, each {job id, lease token, kind, values...}:
--   c  completed       rv (JSON), attempts made
--   f  failed (final)  error, stack, error history (JSON), attempts made
--   r  retry           error, stack, error history (JSON), attempts made, delay ms
--   l  return unused   delay ms, scope ('' front of its queue | 'q' queue limited for delay |
--                      'g' group limited for delay | 'd' delayed by delay)
-- The worker's idle registration is withdrawn and its inbox drained first (those jobs are
-- returned in `handed`); when it gets fewer jobs than wanted it is registered idle again.
-- Returns {codes, jobs, next_in, rl_ttl, maxed, handed}: codes has per entry 1 applied, 0 already
-- applied (a replay), -1 lease lost; jobs is id, token, hash triples; next_in is ms until the
-- next delayed job or group hold ends (-1 none) when fewer jobs than wanted were leased.
local B = ARGV[1]
local tokpfx = ARGV[2]
local lease = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local block_ms = tonumber(ARGV[5])
local hist = cmsgpack.unpack(ARGV[6])
local entries = cmsgpack.unpack(ARGV[7])
local now = now_ms()
local M = meta_of(B)
local idle_member = tokpfx .. '|' .. lease
rcall('ZREM', B .. ':idle', idle_member)
local inbox = B .. ':w:' .. tokpfx
local handed = rcall('LRANGE', inbox, 0, -1)
if #handed > 0 then
  rcall('DEL', inbox)
  for _, h in ipairs(handed) do
    if h ~= '' then want = want - 1 end
  end
  if want < 0 then want = 0 end
end
local mk = B .. ':metrics'
local codes = {}
local trims = {}
local ncomp, nfail = 0, 0
local ak = B .. ':active'
for e = 1, #entries do
  local en = entries[e]
  local id, tok, kind = en[1], en[2], en[3]
  local A = { en[4], en[5], en[6], en[7], en[8] }
  local a = 1
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
      rcall('HSET', jk, 'tok', 'r' .. tok, 'fon', now, 'rv', A[a], 'atm', A[a + 1])
      emit(B, M, 'e', 'completed', 'id', id, 'rv', A[a])
      finalize(B, M, id, f, false, now, trims, A[a])
      if gid then group_release(B, M, gid, 0) end
      ncomp = ncomp + 1
    elseif kind == 'f' then
      rcall('HSET', jk, 'tok', 'r' .. tok, 'fon', now, 'err', A[a], 'stack', A[a + 1],
        'errs', A[a + 2], 'atm', A[a + 3])
      emit(B, M, 'e', 'failed', 'id', id, 'err', A[a], 'atm', A[a + 3])
      finalize(B, M, id, f, true, now, trims, A[a])
      if gid then group_release(B, M, gid, 0) end
      nfail = nfail + 1
    elseif kind == 'r' then
      local delay = tonumber(A[a + 4])
      rcall('HSET', jk, 'tok', 'r' .. tok, 'err', A[a], 'stack', A[a + 1],
        'errs', A[a + 2], 'atm', A[a + 3])
      emit(B, M, 'e', 'retrying', 'id', id, 'err', A[a], 'atm', A[a + 3], 'delay', delay)
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
      local delay = tonumber(A[a]) or 0
      local scope = A[a + 1]
      rcall('HSET', jk, 'tok', 'r' .. tok)
      if scope == 'q' and delay > 0 then
        rcall('SET', B .. ':qhold', '1', 'PX', delay)
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
        wake(B, M)
        emit(B, M, 'e', 'waiting', 'id', id, 'prev', 'active')
      end
    end
  end
end
apply_trims(trims, now)
local applied = 0
for e = 1, #codes do
  if codes[e] == 1 then applied = applied + 1 end
end
if applied > 0 then
  -- (skipped for a batch whose leases were all lost, e.g. on an obliterated queue)
  for k = 1, #hist, 2 do
    rcall('HINCRBY', mk, hist[k], hist[k + 1])
  end
end
-- Drop the per-minute counts of minutes <= upto (older than 7 days). `sw` remembers how far
-- that was done, so minutes in which nothing finished go too (at most 1440 per call); on a
-- hash without `sw`, whatever has aged is dropped once.
local function age_minutes(upto)
  local sw = tonumber(rcall('HGET', mk, 'sw'))
  local dead = {}
  if not sw then
    for _, f in ipairs(rcall('HKEYS', mk)) do
      local m = tonumber(string.match(f, '^[cf]:(%d+)$'))
      if m and m <= upto then dead[#dead + 1] = f end
    end
    sw = upto
  elseif sw < upto then
    local to = math.min(upto, sw + 1440)
    for m = sw + 1, to do
      dead[#dead + 1] = 'c:' .. m
      dead[#dead + 1] = 'f:' .. m
    end
    sw = to
  else
    return
  end
  for i = 1, #dead, 1000 do
    rcall('HDEL', mk, unpack(dead, i, math.min(i + 999, #dead)))
  end
  rcall('HSET', mk, 'sw', sw)
end

if ncomp + nfail > 0 then
  local minute = math.floor(now / 60000)
  -- all-time totals: Prometheus counters must not drop as minutes age out
  if ncomp > 0 then rcall('HINCRBY', mk, 'ct', ncomp) end
  if nfail > 0 then rcall('HINCRBY', mk, 'ft', nfail) end
  local fresh = false
  if ncomp > 0 and rcall('HINCRBY', mk, 'c:' .. minute, ncomp) == ncomp then fresh = true end
  if nfail > 0 and rcall('HINCRBY', mk, 'f:' .. minute, nfail) == nfail then fresh = true end
  if fresh then age_minutes(minute - 10080) end
  if rcall('ZCARD', ak) == 0 and rcall('ZCARD', B .. ':wait') == 0
      and (tonumber(rcall('GET', B .. ':gw')) or 0) <= 0 then
    emit(B, M, 'e', 'drained')
  end
end
local jobs = {}
local status = {}
local got = fetch(B, M, now, want, tokpfx, now + lease, jobs, status)
if got < want and block_ms > 0 then
  rcall('ZADD', B .. ':idle', now + block_ms + 2000, idle_member)
end
flush_wakes(now)
local next_in = -1
if status.next_at then
  next_in = status.next_at - now
  if next_in < 0 then next_in = 0 end
end
return { codes, jobs, next_in, status.rl_ttl or 0, status.maxed and 1 or 0, handed }
