-- Shared library, prepended to every script by scripts.py.
--
-- Every key of a queue starts with its base B ("<prefix>:{<tag>}..."), so all of them hash to one
-- Redis Cluster slot. Scripts receive B in ARGV[1] and KEYS[1] = B .. ':meta' (for routing) and
-- build the other names here. Other queues that share the hash tag (a dead-letter queue, a flow
-- parent's queue) are reached the same way, from their own base.
--
-- Keys under B (see docs/queue-core.md for the full table):
--   meta     HASH    queue settings: paused, conc, rlm, rld, gc, grlm, grld, strict, dlq, maxev
--   ctr      STRING  add counter (auto ids and the global add order `seq`)
--   pseq     STRING  order counter inside a priority band of `wait`, reset when `wait` empties
--   wait     ZSET    ungrouped waiting jobs, score = prio*2^32 + position (see wait_score)
--   active   ZSET    jobs under lease, score = lease expiry (ms, server clock)
--   delayed  ZSET    score = ready time (ms)
--   completed/failed ZSET score = finish time (ms)
--   idle     ZSET    idle workers waiting for a handoff: "<token prefix>|<lease ms>" -> deadline
--   w:<pfx>  LIST    a worker's handoff inbox: jobs leased to it while it was idle (JSON)
--   events   STREAM  capped at meta.maxev (approximate)
--   j:<id>   HASH    the job;  l:<id> LIST its logs;  de:<key> STRING dedup key -> job id
--   limiter  STRING  global rate-limit window counter;  stall STRING sweep throttle
--   metrics  HASH    per-minute counters and processing-time histogram
--   groups   ZSET    known groups (score 0, ordered by name)
--   g:<gid>  LIST    a group's waiting jobs (FIFO)
--   gm:<gid> HASH    group state: a active, c concurrency override, p paused, h held-until,
--                    r ready level ('' = not ready), vt virtual time, w weight, lm/ld rate limit
--   gready:<p> ZSET  ready groups at priority level p, score = virtual time
--   gprios   ZSET    priority levels that may have ready groups (cleaned lazily)
--   gheld    ZSET    held groups (rate limit, strict-order retry backoff), score = until
--   gclock   STRING  virtual clock for weighted round-robin between groups
--   gw       STRING  number of jobs waiting inside groups
--   wc       ZSET    parents waiting for children;  deps:<id> SET, cres:<id> HASH (flows)

local rcall = redis.call
local PB = 4294967296          -- width of one priority band in `wait` (2^32)
local B30 = 1073741824         -- 2^30
local FIFO_BASE = 2147483648   -- band offsets: [0,2^30) front, [2^30,2^31) LIFO, [2^31,2^32) FIFO
local LIFO_TOP = 2147483647

local function now_ms()
  local t = rcall('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Rate limits are GCRA (a token bucket kept as one "theoretical arrival time" per key): `max`
-- starts per `dur` ms in steady state, bursts of up to `max`. Unlike a fixed window, capacity
-- accrues while workers sleep, so their wake-up lag does not lower the achieved rate.
-- How many of `want` starts are allowed now, and if none, ms until the next one is.
local function gcra_allowed(key, max, dur, now, want)
  local t = dur / max
  local tat = tonumber(rcall('GET', key)) or now
  if tat < now then tat = now end
  local allowed = math.floor((now + dur - t - tat) / t) + 1
  if allowed <= 0 then return 0, math.ceil(tat - (dur - t) - now) end
  if allowed > want then allowed = want end
  return allowed, 0
end

-- Record `n` starts; returns the time from which the next start is allowed (ms), or false.
local function gcra_take(key, max, dur, now, n)
  local t = dur / max
  local tat = tonumber(rcall('GET', key)) or now
  if tat < now then tat = now end
  tat = tat + n * t
  rcall('SET', key, tat, 'PX', math.ceil(tat - now + dur))
  if tat - now > dur - t then return tat - (dur - t) end
  return false
end

local function meta_of(B)
  local m = rcall('HMGET', B .. ':meta', 'paused', 'conc', 'rlm', 'rld', 'gc', 'grlm', 'grld',
    'strict', 'dlq', 'maxev', 'dlqname', 'dlqmax')
  return {
    B = B,
    paused = m[1] == '1',
    conc = tonumber(m[2]),
    rlm = tonumber(m[3]), rld = tonumber(m[4]),
    gc = tonumber(m[5]) or 1,
    grlm = tonumber(m[6]), grld = tonumber(m[7]),
    strict = m[8] ~= '0',
    dlq = m[9] or nil, dlqname = m[11] or nil,
    maxev = tonumber(m[10]) or 10000,
    dlqmax = tonumber(m[12]) or 10000,
  }
end

local function emit(B, M, ...)
  rcall('XADD', B .. ':events', 'MAXLEN', '~', M.maxev, '*', ...)
end

-- Work became startable: remembered here and acted on once, at the end of the script, by
-- flush_wakes (which hands jobs straight to idle workers). `poke` asks one idle worker to wake
-- and re-read its timeout (a new earliest delayed job).
local WAKE_QUEUE, WAKE_SEEN, POKE = {}, {}, {}
local function wake(B, M)
  if M.paused or WAKE_SEEN[B] then return end
  WAKE_SEEN[B] = true
  WAKE_QUEUE[#WAKE_QUEUE + 1] = M
end

local function poke(B)
  POKE[B] = true
end

local function to_map(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end

-- Position inside the priority band: FIFO at the tail, LIFO ahead of FIFO, "front" ahead of both.
local function wait_score(B, prio, lifo, M)
  local s
  local blk = M and M.pseq_block
  if blk and blk.left > 0 then
    s = blk.next % B30
    blk.next = blk.next + 1
    blk.left = blk.left - 1
  else
    s = rcall('INCR', B .. ':pseq') % B30
  end
  if lifo then return prio * PB + LIFO_TOP - s end
  return prio * PB + FIFO_BASE + s
end

local function front_score(prio, seq)
  return prio * PB + (seq % B30)
end

------------------------------------------------------------------------------------------------
-- Groups
------------------------------------------------------------------------------------------------

-- A group's state hash gm:<gid>, read with one HMGET of GM (positions G_*):
--   a active jobs, c concurrency override, p paused ('1'), h held until (ms, '' = not held),
--   r ready level ('' = not in a ready set), vt virtual time, lm/ld rate-limit override,
--   pr priority of the group's jobs (the latest added job's), w weight.
local GM = { 'a', 'c', 'p', 'h', 'r', 'vt', 'lm', 'ld', 'pr', 'w' }
local G_A, G_C, G_P, G_H, G_R, G_VT, G_LM, G_LD, G_PR, G_W = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10

local function gm_read(B, gid)
  return rcall('HMGET', B .. ':gm:' .. gid, unpack(GM))
end

-- The virtual clock, read once per script (M caches it; fetch advances it).
local function gclock(B, M)
  if M.clock == nil then M.clock = tonumber(rcall('GET', B .. ':gclock')) or 0 end
  return M.clock
end

-- Bring the group's ready-set membership in line with its state `f` (with `active` jobs) and
-- write `extra` (field/value list) plus the new ready level in one HSET. A group is ready when
-- it has waiting jobs, is not paused or held, and runs fewer jobs than its concurrency.
-- Returns true when the group became ready.
local function group_apply(B, M, gid, f, active, extra)
  local gm = B .. ':gm:' .. gid
  local glist = B .. ':g:' .. gid
  local level = f[G_R]
  if level == '' then level = false end
  local held = f[G_H] and f[G_H] ~= ''
  local cap = tonumber(f[G_C]) or M.gc
  local size = nil
  local eligible = f[G_P] ~= '1' and not held and active < cap
  if eligible then
    size = rcall('LLEN', glist)
    eligible = size > 0
  end
  local became = false
  if eligible and not level then
    local prio = tonumber(f[G_PR])
    if not prio then
      prio = tonumber(rcall('HGET', B .. ':j:' .. rcall('LINDEX', glist, 0), 'prio')) or 0
    end
    local vt = tonumber(f[G_VT]) or 0
    local clock = gclock(B, M)
    if vt < clock then vt = clock end
    rcall('ZADD', B .. ':gready:' .. prio, vt, gid)
    M.levels = M.levels or {}
    if not M.levels[prio] then
      rcall('ZADD', B .. ':gprios', prio, prio)
      M.levels[prio] = true
    end
    extra[#extra + 1] = 'r'
    extra[#extra + 1] = prio
    became = true
    wake(B, M)
  elseif level and not eligible then
    rcall('ZREM', B .. ':gready:' .. level, gid)
    extra[#extra + 1] = 'r'
    extra[#extra + 1] = ''
  end
  if not eligible and active <= 0 and f[G_P] ~= '1' and not f[G_C] and not f[G_LM] and not held then
    if size == nil then size = rcall('LLEN', glist) end
    if size == 0 then
      -- An idle, empty group with no setting of its own leaves no trace.
      rcall('DEL', gm)
      rcall('ZREM', B .. ':groups', gid)
      return false
    end
  end
  if #extra > 0 then rcall('HSET', gm, unpack(extra)) end
  return became
end

local function group_sync(B, M, gid)
  local f = gm_read(B, gid)
  return group_apply(B, M, gid, f, tonumber(f[G_A]) or 0, {})
end

-- One of the group's jobs left `active` (finished, retried, returned); optionally hold the group.
local function group_release(B, M, gid, hold_until)
  local f = gm_read(B, gid)
  local active = (tonumber(f[G_A]) or 1) - 1
  if active < 0 then active = 0 end
  local extra = { 'a', active }
  if hold_until and hold_until > 0 and (not f[G_H] or f[G_H] == '' or tonumber(f[G_H]) < hold_until) then
    f[G_H] = tostring(hold_until)
    extra[#extra + 1] = 'h'
    extra[#extra + 1] = hold_until
    rcall('ZADD', B .. ':gheld', hold_until, gid)
  end
  group_apply(B, M, gid, f, active, extra)
end

-- Put a group on hold until `until_ms` (it leaves the ready sets until then).
local function group_hold(B, M, gid, until_ms)
  local f = gm_read(B, gid)
  if not f[G_H] or f[G_H] == '' or tonumber(f[G_H]) < until_ms then
    f[G_H] = tostring(until_ms)
    rcall('ZADD', B .. ':gheld', until_ms, gid)
    rcall('ZADD', B .. ':groups', 0, gid)
    group_apply(B, M, gid, f, tonumber(f[G_A]) or 0, { 'h', until_ms })
  end
end

-- Release holds that have expired; returns the earliest remaining hold (or false).
local function promote_held_groups(B, M, now)
  local hk = B .. ':gheld'
  local due = rcall('ZRANGEBYSCORE', hk, '-inf', now, 'LIMIT', 0, 1000)
  for i = 1, #due do
    local f = gm_read(B, due[i])
    f[G_H] = ''
    group_apply(B, M, due[i], f, tonumber(f[G_A]) or 0, { 'h', '' })
  end
  if #due > 0 then rcall('ZREM', hk, unpack(due)) end
  local nxt = rcall('ZRANGE', hk, 0, 0, 'WITHSCORES')
  if nxt[2] then return tonumber(nxt[2]) end
  return false
end

------------------------------------------------------------------------------------------------
-- Placement
------------------------------------------------------------------------------------------------

-- Make a job startable. `where`: 'tail' (normal), 'front' (returned or stalled: keep its place).
local function place_waiting(B, M, id, prio, gid, seq, lifo, where)
  if gid and gid ~= '' then
    local glist = B .. ':g:' .. gid
    if where == 'front' then rcall('LPUSH', glist, id) else rcall('RPUSH', glist, id) end
    rcall('INCR', B .. ':gw')
    local f = gm_read(B, gid)
    if not f[G_A] and not f[G_R] and not f[G_PR] then rcall('ZADD', B .. ':groups', 0, gid) end
    f[G_PR] = prio
    group_apply(B, M, gid, f, tonumber(f[G_A]) or 0, { 'pr', prio })
    return
  end
  local score
  if where == 'front' then score = front_score(prio, seq) else score = wait_score(B, prio, lifo, M) end
  if M.zbatch then
    -- a bulk add collects its members and writes them with one ZADD (see flush_zbatch)
    local zb = M.zbatch
    zb[#zb + 1] = score
    zb[#zb + 1] = id
  else
    rcall('ZADD', B .. ':wait', score, id)
  end
  wake(B, M)
end

local function place_delayed(B, id, ready_at)
  local dk = B .. ':delayed'
  rcall('ZADD', dk, ready_at, id)
  -- A new earliest delayed job must shorten idle workers' block timeout: poke them.
  local first = rcall('ZRANGE', dk, 0, 0)
  if first[1] == id then poke(B) end
end

-- Move due delayed jobs into waiting, oldest ready time first, add order inside one ms.
local function promote_delayed(B, M, now, limit)
  local dk = B .. ':delayed'
  local due = rcall('ZRANGEBYSCORE', dk, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
  if #due == 0 then return 0 end
  local items = {}
  for i = 1, #due, 2 do
    local f = rcall('HMGET', B .. ':j:' .. due[i], 'prio', 'gid', 'seq', 'lifo')
    items[#items + 1] = { id = due[i], at = tonumber(due[i + 1]), prio = tonumber(f[1]) or 0,
      gid = f[2], seq = tonumber(f[3]) or 0, lifo = f[4] == '1' }
  end
  table.sort(items, function(a, b)
    if a.at ~= b.at then return a.at < b.at end
    return a.seq < b.seq
  end)
  local ids = {}
  for i = 1, #items do
    local it = items[i]
    ids[i] = it.id
    place_waiting(B, M, it.id, it.prio, it.gid, it.seq, it.lifo, 'tail')
    emit(B, M, 'e', 'waiting', 'id', it.id, 'prev', 'delayed')
  end
  for i = 1, #ids, 500 do
    rcall('ZREM', dk, unpack(ids, i, math.min(i + 499, #ids)))
  end
  return #items
end

------------------------------------------------------------------------------------------------
-- Adding
------------------------------------------------------------------------------------------------

-- Delete a job's keys and its traces in non-state structures (caller removes it from its state).
local function delete_job_keys(B, id)
  rcall('DEL', B .. ':j:' .. id, B .. ':l:' .. id)
end

-- j = {id, prio, ready_at, lifo, gid, weight, gmax, ddid, ddttl, ddmode, fields = {...}}
-- Returns {id, status, extra}: status 1 added, 0 duplicate job id (extra = stored hash),
-- 2 deduplicated (extra = ''), -1 group full.
local function flush_zbatch(B, M)
  local zb = M.zbatch
  if not zb then return end
  for i = 1, #zb, 1000 do
    rcall('ZADD', B .. ':wait', unpack(zb, i, math.min(i + 999, #zb)))
  end
  M.zbatch = nil
end

local function add_one(B, M, now, j)
  local seq
  local blk = M.seq_block
  if blk and blk.left > 0 then
    seq = blk.next
    blk.next = blk.next + 1
    blk.left = blk.left - 1
  else
    seq = rcall('INCR', B .. ':ctr')
  end
  local id = j.id
  if id == '' then
    id = string.format('%d', seq)
  elseif rcall('EXISTS', B .. ':j:' .. id) == 1 then
    emit(B, M, 'e', 'duplicated', 'id', id)
    return { id, 0, rcall('HGETALL', B .. ':j:' .. id) }
  end
  local gid = j.gid
  if gid == '' then gid = false end
  if gid and j.gmax > 0 and rcall('LLEN', B .. ':g:' .. gid) >= j.gmax then
    return { id, -1, '' }
  end
  if j.ddid ~= '' then
    local dk = B .. ':de:' .. j.ddid
    local existing = rcall('GET', dk)
    if existing and rcall('EXISTS', B .. ':j:' .. existing) == 1 then
      if j.ddmode == 'debounce' and rcall('ZSCORE', B .. ':delayed', existing) then
        -- The pending job is replaced by this one; its delay starts again.
        rcall('ZREM', B .. ':delayed', existing)
        delete_job_keys(B, existing)
        emit(B, M, 'e', 'removed', 'id', existing, 'reason', 'debounced', 'by', id)
      elseif j.ddmode ~= 'debounce' then
        emit(B, M, 'e', 'deduplicated', 'id', existing, 'dedup', j.ddid)
        return { existing, 2, '' }
      end
    end
    if j.ddttl > 0 then
      rcall('SET', dk, id, 'PX', j.ddttl)
    else
      rcall('SET', dk, id)
    end
  end
  local jk = B .. ':j:' .. id
  rcall('HSET', jk, 'ts', now, 'seq', seq, 'prio', j.prio, unpack(j.fields))
  if gid then
    rcall('HSET', jk, 'gid', gid)
    if j.weight and j.weight ~= 1 then rcall('HSET', B .. ':gm:' .. gid, 'w', j.weight) end
  end
  if j.lifo then rcall('HSET', jk, 'lifo', '1') end
  if j.ddid ~= '' then rcall('HSET', jk, 'ddk', j.ddid, 'ddm', j.ddmode) end
  if j.hold then
    -- a flow parent: it waits for its children (see add_flow and parent_child_done)
    rcall('ZADD', B .. ':wc', now, id)
    emit(B, M, 'e', 'waiting-children', 'id', id)
  elseif j.ready_at > now then
    rcall('HSET', jk, 'rdy', j.ready_at)
    place_delayed(B, id, j.ready_at)
    emit(B, M, 'e', 'delayed', 'id', id, 'at', j.ready_at)
  else
    place_waiting(B, M, id, j.prio, gid, seq, j.lifo, 'tail')
    if M.waiting_ids then
      M.waiting_ids[#M.waiting_ids + 1] = id  -- one 'waiting' entry for the batch, see add_jobs
    else
      emit(B, M, 'e', 'waiting', 'id', id)
    end
  end
  return { id, 1, '' }
end

-- Add the pending job of scheduler `sid` for run `at` (ms) from its template, unless it
-- exists (the id is deterministic, so this is idempotent).
local function schedule_job(B, M, now, sid, at)
  local tmpl = cmsgpack.unpack(rcall('HGET', B .. ':sch:' .. sid, 'tmpl'))
  local fields = tmpl[11]
  fields[#fields + 1] = 'sch'
  fields[#fields + 1] = sid
  fields[#fields + 1] = 'schat'
  fields[#fields + 1] = at
  fields[#fields + 1] = 'schspec'
  fields[#fields + 1] = rcall('HGET', B .. ':sch:' .. sid, 'spec')
  return add_one(B, M, now, {
    id = 'sch:' .. sid .. ':' .. string.format('%d', at), prio = tmpl[1], ready_at = at,
    lifo = false, gid = tmpl[5], weight = tmpl[6], gmax = 0, ddid = '', ddttl = 0, ddmode = '',
    fields = fields,
  })
end

-- Schedulers whose pending job vanished (removed by an operator, or its start could not
-- advance the chain) get it back, so a schedule never silently stops.
local function repair_schedulers(B, M, now)
  local late = rcall('ZRANGEBYSCORE', B .. ':sched', '-inf', now - 5000, 'LIMIT', 0, 100)
  for _, sid in ipairs(late) do
    local at = tonumber(rcall('HGET', B .. ':sch:' .. sid, 'next'))
    if at and at > 0 and rcall('EXISTS', B .. ':j:sch:' .. sid .. ':' .. string.format('%d', at)) == 0 then
      schedule_job(B, M, now, sid, at)
    elseif not at then
      rcall('ZREM', B .. ':sched', sid)
    end
  end
end

------------------------------------------------------------------------------------------------
-- Finishing
------------------------------------------------------------------------------------------------

-- Fields every finishing path reads from the job hash, in this order.
local FIN_FIELDS = { 'prio', 'gid', 'roc', 'rof', 'ddk', 'ddm', 'pid', 'pb', 'pfp', 'seq', 'sch' }
local F_PRIO, F_GID, F_ROC, F_ROF, F_DDK, F_DDM, F_PID, F_PB, F_PFP, F_SEQ, F_SCH =
  1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11

local function fin_fields(jk)
  return rcall('HMGET', jk, unpack(FIN_FIELDS))
end

-- spec "count,age_s": count -1 = keep any number, 0 = delete at once; age 0 = no age limit.
local function parse_keep(spec)
  if not spec or spec == '' then spec = '-1,0' end
  local c, a = string.match(spec, '^(-?%d+),(%d+)$')
  return tonumber(c) or -1, tonumber(a) or 0
end

local function trim_finished(B, set, count, age, now)
  local sk = B .. ':' .. set
  if age > 0 then
    local old = rcall('ZRANGEBYSCORE', sk, '-inf', now - age * 1000, 'LIMIT', 0, 1000)
    for i = 1, #old do delete_job_keys(B, old[i]) end
    if #old > 0 then rcall('ZREM', sk, unpack(old)) end
  end
  if count >= 0 then
    -- Trim in batches: the set may overshoot by up to 10% so that not every finish pays a delete.
    local card = rcall('ZCARD', sk)
    local slack = math.max(1, math.floor(count / 10))
    if card >= count + slack then
      local n = card - count
      if n > 1000 then n = 1000 end
      local over = rcall('ZRANGE', sk, 0, n - 1)
      for i = 1, #over do delete_job_keys(B, over[i]) end
      rcall('ZREMRANGEBYRANK', sk, 0, n - 1)
    end
  end
end

local function dead_letter(B, M, id, jk, now)
  if not M.dlq then return end
  local src = rcall('HMGET', jk, 'name', 'data', 'errs', 'atm', 'ts', 'err', 'stack')
  local DM = meta_of(M.dlq)
  add_one(M.dlq, DM, now, {
    id = '', prio = 0, ready_at = 0, lifo = false, gid = '', weight = 1, gmax = 0,
    ddid = '', ddttl = 0, ddmode = '',
    fields = { 'name', src[1] or '', 'data', src[2] or 'null', 'errs', src[3] or '[]',
      'src', B, 'srcid', id, 'srcatm', src[4] or '0', 'srcts', src[5] or '0',
      'err', src[6] or '', 'stack', src[7] or '', 'att', '1', 'roc', '10000,2592000', 'rof', '10000,2592000' },
  })
  -- Bounded: a poison-message storm must not grow Redis without limit (under noeviction it
  -- would stop every queue). The oldest copies beyond the source queue's cap go first.
  local wk = M.dlq .. ':wait'
  local over = rcall('ZCARD', wk) - M.dlqmax
  if over > 0 then
    local old = rcall('ZRANGE', wk, 0, math.min(over, 1000) - 1)
    for i = 1, #old do delete_job_keys(M.dlq, old[i]) end
    rcall('ZREM', wk, unpack(old))
    emit(M.dlq, DM, 'e', 'removed', 'id', old[1], 'reason', 'dead-letter cap', 'n', #old)
  end
end

local finalize   -- forward: flows make it recursive (a failed child may fail its parent)

-- A flow parent whose last pending child just finished becomes startable.
local function parent_child_done(PB_, pid, childkey, rv, failed, policy, now, trims)
  local pjk = PB_ .. ':j:' .. pid
  if rcall('EXISTS', pjk) == 0 then return end
  local PM = meta_of(PB_)
  local waiting_children = rcall('ZSCORE', PB_ .. ':wc', pid)
  if failed then
    rcall('HSET', PB_ .. ':cfail:' .. pid, childkey, rv)
    if policy == 'fail' or policy == '' or not policy then
      if waiting_children then
        rcall('ZREM', PB_ .. ':wc', pid)
        rcall('HSET', pjk, 'fon', now, 'err', 'child ' .. childkey .. ' failed',
          'errs', '[]')
        finalize(PB_, PM, pid, fin_fields(pjk), true, now, trims)
        emit(PB_, PM, 'e', 'failed', 'id', pid, 'err', 'child ' .. childkey .. ' failed')
      end
      return
    end
    if policy == 'continue' then
      rcall('SREM', PB_ .. ':deps:' .. pid, childkey)
      if waiting_children then
        rcall('ZREM', PB_ .. ':wc', pid)
        local pf = rcall('HMGET', pjk, 'prio', 'gid', 'seq')
        place_waiting(PB_, PM, pid, tonumber(pf[1]) or 0, pf[2], tonumber(pf[3]) or 0, false, 'tail')
        emit(PB_, PM, 'e', 'waiting', 'id', pid, 'prev', 'waiting-children')
      end
      return
    end
    -- 'ignore': the failure is recorded and counts as done
  else
    rcall('HSET', PB_ .. ':cres:' .. pid, childkey, rv)
  end
  rcall('SREM', PB_ .. ':deps:' .. pid, childkey)
  if waiting_children and rcall('SCARD', PB_ .. ':deps:' .. pid) == 0 then
    rcall('ZREM', PB_ .. ':wc', pid)
    local pf = rcall('HMGET', pjk, 'prio', 'gid', 'seq')
    place_waiting(PB_, PM, pid, tonumber(pf[1]) or 0, pf[2], tonumber(pf[3]) or 0, false, 'tail')
    emit(PB_, PM, 'e', 'waiting', 'id', pid, 'prev', 'waiting-children')
  end
end

-- Move a job (already out of its previous state) to completed/failed, applying retention,
-- the dedup key, the dead-letter copy and its flow parent. `f` = fin_fields(jk).
finalize = function(B, M, id, f, failed, now, trims, rv)
  local jk = B .. ':j:' .. id
  if f[F_DDK] then
    local dk = B .. ':de:' .. f[F_DDK]
    -- A TTL window outlives the job on purpose; the other modes end with it.
    if f[F_DDM] ~= 'ttl' and rcall('GET', dk) == id then rcall('DEL', dk) end
  end
  if failed then dead_letter(B, M, id, jk, now) end
  if f[F_PID] then
    parent_child_done(f[F_PB], f[F_PID], B .. '|' .. id, rv or 'null', failed, f[F_PFP], now, trims)
  end
  local set = 'completed'
  local spec = f[F_ROC]
  if failed then set = 'failed'; spec = f[F_ROF] end
  local count, age = parse_keep(spec)
  if count == 0 then
    delete_job_keys(B, id)
    rcall('DEL', B .. ':deps:' .. id, B .. ':cres:' .. id, B .. ':cfail:' .. id)
  else
    -- Jobs finished in the same ms keep their finishing order (ties would sort by id text,
    -- "10" before "9"): a sub-ms offset from a counter that increases across calls, reserved
    -- in blocks (ms * 4096 stays below 2^53; the order can invert once per 4096 finishes).
    if not M.fleft or M.fleft == 0 then
      M.fnext = rcall('INCRBY', B .. ':fseq', 256) - 256
      M.fleft = 256
    end
    local k = M.fnext % 4096
    M.fnext = M.fnext + 1
    M.fleft = M.fleft - 1
    rcall('ZADD', B .. ':' .. set, now + k / 4096, id)
    local key = B .. '|' .. set .. '|' .. count .. '|' .. age
    if not trims[key] then trims[key] = { B = B, set = set, count = count, age = age } end
  end
end

local function apply_trims(trims, now)
  for _, t in pairs(trims) do trim_finished(t.B, t.set, t.count, t.age, now) end
end

-- Put a job that left `active` without finishing back where it can start again, at the front.
local function requeue_front(B, M, id, f)
  local gid = f[F_GID]
  if gid then
    rcall('LPUSH', B .. ':g:' .. gid, id)
    rcall('INCR', B .. ':gw')
    group_release(B, M, gid, 0)
  else
    rcall('ZADD', B .. ':wait', front_score(tonumber(f[F_PRIO]) or 0, tonumber(f[F_SEQ]) or 0), id)
    wake(B, M)
  end
end

------------------------------------------------------------------------------------------------
-- Fetching
------------------------------------------------------------------------------------------------

local function activate(B, M, id, now, tokpfx, lease_until, out)
  local jk = B .. ':j:' .. id
  local h = rcall('HGETALL', jk)
  if #h == 0 then return false end   -- an orphan id: nothing to run
  local ats = 0
  for i = 1, #h, 2 do
    if h[i] == 'ats' then ats = tonumber(h[i + 1]) or 0; break end
  end
  ats = ats + 1
  local tok = tokpfx .. ':' .. ats
  rcall('HSET', jk, 'tok', tok, 'pon', now, 'ats', ats)
  rcall('ZADD', B .. ':active', lease_until, id)
  emit(B, M, 'e', 'active', 'id', id)
  out[#out + 1] = id
  out[#out + 1] = tok
  out[#out + 1] = h
  return true
end

-- Take the next job of group `gid`, just popped from a ready set with virtual time `vt`.
-- Returns the job id or false (an inconsistent, empty group).
local function take_from_group(B, M, gid, vt, now)
  local gm = B .. ':gm:' .. gid
  local id = rcall('LPOP', B .. ':g:' .. gid)
  local f = gm_read(B, gid)
  f[G_R] = ''
  if not id then
    rcall('HSET', gm, 'r', '')
    return false
  end
  M.gw_taken = (M.gw_taken or 0) + 1
  local active = (tonumber(f[G_A]) or 0) + 1
  local w = tonumber(f[G_W]) or 1
  if w <= 0 then w = 1 end
  local nvt = vt + 1 / w
  f[G_VT] = nvt
  if vt > gclock(B, M) then
    M.clock = vt
    M.clock_dirty = true
  end
  local extra = { 'a', active, 'vt', nvt, 'r', '' }
  local lm = tonumber(f[G_LM]) or M.grlm
  if lm then
    local next_at = gcra_take(B .. ':grl:' .. gid, lm, tonumber(f[G_LD]) or M.grld or 1000, now, 1)
    if next_at then
      -- the group used up its allowance: hold it until its next start is allowed
      local untl = math.ceil(next_at)
      f[G_H] = tostring(untl)
      extra[#extra + 1] = 'h'
      extra[#extra + 1] = untl
      rcall('ZADD', B .. ':gheld', untl, gid)
    end
  end
  group_apply(B, M, gid, f, active, extra)
  return id
end

-- When the next delayed job or group hold is due (ms), for an idle worker's timeout.
local function next_due(B, next_hold)
  local d = rcall('ZRANGE', B .. ':delayed', 0, 0, 'WITHSCORES')
  local nxt = false
  if d[2] then nxt = tonumber(d[2]) end
  if next_hold and (not nxt or next_hold < nxt) then nxt = next_hold end
  return nxt
end

local function fetch(B, M, now, want, tokpfx, lease_until, out, status, skip_promote)
  local next_hold = false
  if not skip_promote then
    promote_delayed(B, M, now, 1000)
    next_hold = promote_held_groups(B, M, now)
  end
  if M.paused then
    -- a paused queue still promotes due delayed jobs: keep waking for them
    if want > 0 then status.next_at = next_due(B, next_hold) end
    return 0
  end
  if want <= 0 then return 0 end
  if M.conc then
    local room = M.conc - rcall('ZCARD', B .. ':active')
    if room < want then want = room end
    if want <= 0 then status.maxed = true; return 0 end
  end
  -- A manual rate limit (a processor raised RateLimitError) holds the whole queue.
  local hold = rcall('PTTL', B .. ':qhold')
  if hold > 0 then
    status.rl_ttl = hold
    return 0
  end
  local lk = B .. ':limiter'
  if M.rlm then
    local allowed, wait = gcra_allowed(lk, M.rlm, M.rld or 1000, now, want)
    if allowed == 0 then
      status.rl_ttl = math.max(1, wait)
      return 0
    end
    want = allowed
  end
  local wk = B .. ':wait'
  local got = 0
  local took_ungrouped = false
  local head_prio = nil  -- priority of the ungrouped head; false when `wait` is empty
  local guard = 0
  while got < want and guard < want * 4 + 10 do
    guard = guard + 1
    local lv = rcall('ZRANGE', B .. ':gprios', 0, 0, 'WITHSCORES')
    if not lv[1] then
      local popped = rcall('ZPOPMIN', wk, want - got)
      for i = 1, #popped, 2 do
        if activate(B, M, popped[i], now, tokpfx, lease_until, out) then got = got + 1 end
      end
      if #popped > 0 then took_ungrouped = true end
      break
    end
    local level = tonumber(lv[2])
    if head_prio == nil then
      local head = rcall('ZRANGE', wk, 0, 0, 'WITHSCORES')
      head_prio = head[1] and math.floor(tonumber(head[2]) / PB) or false
    end
    if head_prio and head_prio <= level then
      -- Ungrouped jobs win ties with groups of the same priority.
      local ids = rcall('ZRANGEBYSCORE', wk, '-inf', string.format('(%.0f', (level + 1) * PB),
        'LIMIT', 0, want - got)
      if #ids > 0 then rcall('ZREM', wk, unpack(ids)) end
      took_ungrouped = true
      head_prio = nil
      for i = 1, #ids do
        if activate(B, M, ids[i], now, tokpfx, lease_until, out) then got = got + 1 end
      end
    else
      -- Serve up to the remaining slots from the groups of this level, smallest virtual time
      -- first; a group with room left re-enters its ready set with a later virtual time.
      local popped = rcall('ZPOPMIN', B .. ':gready:' .. level, want - got)
      if #popped == 0 then
        rcall('ZREM', B .. ':gprios', level)
        if M.levels then M.levels[level] = nil end
      end
      for i = 1, #popped, 2 do
        local id = take_from_group(B, M, popped[i], tonumber(popped[i + 1]), now)
        if id and activate(B, M, id, now, tokpfx, lease_until, out) then got = got + 1 end
      end
    end
  end
  if M.gw_taken then
    rcall('DECRBY', B .. ':gw', M.gw_taken)
    M.gw_taken = nil
  end
  if M.clock_dirty then
    rcall('SET', B .. ':gclock', M.clock)
    M.clock_dirty = nil
  end
  if took_ungrouped and rcall('ZCARD', wk) == 0 then rcall('DEL', B .. ':pseq') end
  if M.rlm and got > 0 then gcra_take(lk, M.rlm, M.rld or 1000, now, got) end
  if got > 0 and got == want then
    wake(B, M)  -- work may remain: offer it to idle workers at the end of the script
  end
  if got < want then status.next_at = next_due(B, next_hold) end
  return got
end

------------------------------------------------------------------------------------------------
-- Handoff to idle workers
------------------------------------------------------------------------------------------------

local function split_member(member)
  local sep = string.find(member, '|', 1, true)
  return string.sub(member, 1, sep - 1), tonumber(string.sub(member, sep + 1))
end

-- Lease startable jobs to registered idle workers (one per registration) and push each into its
-- worker's inbox, so an idle worker gets its job in the same round trip that made it startable.
local function handoff(B, M, now)
  local ik = B .. ':idle'
  while true do
    -- (one command when nobody is idle, the common case under load)
    local w = rcall('ZRANGE', ik, 0, 0, 'WITHSCORES')
    if not w[1] then return end
    if tonumber(w[2]) <= now then
      rcall('ZREMRANGEBYSCORE', ik, '-inf', now)  -- registrations whose worker went away
    else
      local pfx, lease = split_member(w[1])
      local out = {}
      if fetch(B, M, now, 1, pfx, now + lease, out, {}, true) == 0 then return end
      rcall('ZREM', ik, w[1])
      local lk = B .. ':w:' .. pfx
      rcall('RPUSH', lk, cjson.encode(out))
      rcall('PEXPIRE', lk, lease + 60000)
    end
  end
end

local function flush_wakes(now)
  local i = 1
  while WAKE_QUEUE[i] do
    handoff(WAKE_QUEUE[i].B, WAKE_QUEUE[i], now)
    i = i + 1
  end
  for B in pairs(POKE) do
    local ik = B .. ':idle'
    local w = rcall('ZRANGEBYSCORE', ik, now, '+inf', 'LIMIT', 0, 1)
    if w[1] then
      rcall('ZREM', ik, w[1])
      local lk = B .. ':w:' .. split_member(w[1])
      rcall('RPUSH', lk, '')
      rcall('PEXPIRE', lk, 60000)
    end
  end
end
