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

local function meta_of(B)
  local m = rcall('HMGET', B .. ':meta', 'paused', 'conc', 'rlm', 'rld', 'gc', 'grlm', 'grld',
    'strict', 'dlq', 'maxev', 'dlqname')
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

-- Make the group's presence in the ready sets match its state. `f` is the HMGET of
-- a, c, p, h, r, vt, lm (pass nil to read it). Returns true when the group became ready.
local function group_sync(B, M, gid, f)
  local gm = B .. ':gm:' .. gid
  if not f then f = rcall('HMGET', gm, 'a', 'c', 'p', 'h', 'r', 'vt', 'lm') end
  local active = tonumber(f[1]) or 0
  local cap = tonumber(f[2]) or M.gc
  local level = f[5]
  if level == '' then level = false end
  local glist = B .. ':g:' .. gid
  local head = false
  if (f[3] ~= '1') and (not f[4] or f[4] == '') and active < cap then
    head = rcall('LINDEX', glist, 0)
  end
  if head then
    if not level then
      local prio = tonumber(rcall('HGET', B .. ':j:' .. head, 'prio')) or 0
      local vt = tonumber(f[6]) or 0
      local clock = tonumber(rcall('GET', B .. ':gclock')) or 0
      if vt < clock then vt = clock end
      rcall('ZADD', B .. ':gready:' .. prio, vt, gid)
      rcall('ZADD', B .. ':gprios', prio, prio)
      rcall('HSET', gm, 'r', prio)
      return true
    end
    return false
  end
  if level then
    rcall('ZREM', B .. ':gready:' .. level, gid)
    rcall('HSET', gm, 'r', '')
  end
  -- An idle, empty group with no persistent setting leaves no trace.
  if active <= 0 and f[3] ~= '1' and not f[2] and not f[7] and rcall('LLEN', glist) == 0 then
    rcall('DEL', gm)
    rcall('ZREM', B .. ':groups', gid)
  end
  return false
end

-- Change a group's active count (a job of it finished or was returned) and resync.
local function group_release(B, M, gid, hold_until)
  local gm = B .. ':gm:' .. gid
  local a = rcall('HINCRBY', gm, 'a', -1)
  if a < 0 then rcall('HSET', gm, 'a', 0) end
  if hold_until and hold_until > 0 then
    local f = rcall('HGET', gm, 'h')
    if not f or f == '' or tonumber(f) < hold_until then
      rcall('HSET', gm, 'h', hold_until)
      rcall('ZADD', B .. ':gheld', hold_until, gid)
    end
  end
  if group_sync(B, M, gid, nil) then wake(B, M) end
end

-- Put a group on hold until `until_ms` (it is taken out of the ready sets).
local function group_hold(B, M, gid, until_ms)
  local gm = B .. ':gm:' .. gid
  local f = rcall('HGET', gm, 'h')
  if not f or f == '' or tonumber(f) < until_ms then
    rcall('HSET', gm, 'h', until_ms)
    rcall('ZADD', B .. ':gheld', until_ms, gid)
    rcall('ZADD', B .. ':groups', 0, gid)
  end
  group_sync(B, M, gid, nil)
end

-- Release holds that have expired; returns the earliest remaining hold (or false).
local function promote_held_groups(B, M, now)
  local hk = B .. ':gheld'
  local due = rcall('ZRANGEBYSCORE', hk, '-inf', now, 'LIMIT', 0, 1000)
  for i = 1, #due do
    rcall('HSET', B .. ':gm:' .. due[i], 'h', '')
    group_sync(B, M, due[i], nil)
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
    rcall('ZADD', B .. ':groups', 0, gid)
    if group_sync(B, M, gid, nil) then wake(B, M) end
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
  if j.ready_at > now then
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
      'err', src[6] or '', 'stack', src[7] or '', 'att', '1', 'roc', '-1,0', 'rof', '-1,0' },
  })
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
    -- "10" before "9"): a sub-ms offset per finish in this call (ms * 4096 stays below 2^53).
    local k = (M.fin or 0) + 1
    if k > 4095 then k = 4095 end
    M.fin = k
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

-- Take the next job of the ready group with the smallest virtual time at `level`.
-- Returns the job id, or false when the level turned out to be empty (stale).
local function take_from_group(B, M, level, now)
  local rk = B .. ':gready:' .. level
  local p = rcall('ZPOPMIN', rk)
  if not p[1] then
    rcall('ZREM', B .. ':gprios', level)
    return false, 0
  end
  local gid, vt = p[1], tonumber(p[2])
  local gm = B .. ':gm:' .. gid
  local id = rcall('LPOP', B .. ':g:' .. gid)
  local f = rcall('HMGET', gm, 'a', 'c', 'p', 'h', 'r', 'vt', 'lm', 'ld', 'w')
  if not id then
    rcall('HSET', gm, 'r', '')
    return nil, vt
  end
  rcall('DECR', B .. ':gw')
  local a = (tonumber(f[1]) or 0) + 1
  local w = tonumber(f[9]) or 1
  if w <= 0 then w = 1 end
  local nvt = vt + 1 / w
  rcall('HSET', gm, 'a', a, 'vt', nvt, 'r', '')
  local held = f[4]
  if held == '' then held = false end
  local lm = tonumber(f[7]) or M.grlm
  if lm then
    local ld = tonumber(f[8]) or M.grld or 1000
    local rl = B .. ':grl:' .. gid
    local n = rcall('INCR', rl)
    if n == 1 then rcall('PEXPIRE', rl, ld) end
    if n >= lm then
      local ttl = rcall('PTTL', rl)
      if ttl < 0 then ttl = ld end
      held = now + ttl
      rcall('HSET', gm, 'h', held)
      rcall('ZADD', B .. ':gheld', held, gid)
    end
  end
  if not held and a < (tonumber(f[2]) or M.gc) then
    group_sync(B, M, gid, { a, f[2], f[3], false, '', nvt, f[7] })
  end
  return id, vt
end

-- Lease up to `want` jobs. Returns the number taken; appends id, token, hash triples to `out`.
-- status.next_at = earliest delayed job or group hold (ms) when idle; status.rl_ttl when limited.
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
  local lk = B .. ':limiter'
  if M.rlm then
    local used = tonumber(rcall('GET', lk)) or 0
    if used >= M.rlm then
      local ttl = rcall('PTTL', lk)
      if ttl < 0 then ttl = M.rld or 1000 end
      status.rl_ttl = ttl
      return 0
    end
    if M.rlm - used < want then want = M.rlm - used end
  elseif rcall('EXISTS', lk) == 1 then
    -- A manual rate limit (a processor said "limited for N ms") holds the whole queue.
    local ttl = rcall('PTTL', lk)
    if ttl > 0 then status.rl_ttl = ttl; return 0 end
  end
  local wk = B .. ':wait'
  local got = 0
  local took_ungrouped = false
  local clock = false
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
    local head = rcall('ZRANGE', wk, 0, 0, 'WITHSCORES')
    if head[1] and math.floor(tonumber(head[2]) / PB) <= level then
      -- Ungrouped jobs win ties with groups of the same priority.
      local ids = rcall('ZRANGEBYSCORE', wk, '-inf', string.format('(%.0f', (level + 1) * PB),
        'LIMIT', 0, want - got)
      if #ids > 0 then rcall('ZREM', wk, unpack(ids)) end
      took_ungrouped = true
      for i = 1, #ids do
        if activate(B, M, ids[i], now, tokpfx, lease_until, out) then got = got + 1 end
      end
    else
      local id, vt = take_from_group(B, M, level, now)
      if id then
        if not clock or vt > clock then clock = vt end
        if activate(B, M, id, now, tokpfx, lease_until, out) then got = got + 1 end
      end
    end
  end
  if clock then rcall('SET', B .. ':gclock', clock) end
  if took_ungrouped and rcall('ZCARD', wk) == 0 then rcall('DEL', B .. ':pseq') end
  if M.rlm and got > 0 then
    if rcall('INCRBY', lk, got) == got then rcall('PEXPIRE', lk, M.rld or 1000) end
  end
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
  rcall('ZREMRANGEBYSCORE', ik, '-inf', now)
  while true do
    local w = rcall('ZRANGE', ik, 0, 0)
    if not w[1] then return end
    local pfx, lease = split_member(w[1])
    local out = {}
    if fetch(B, M, now, 1, pfx, now + lease, out, {}, true) == 0 then return end
    rcall('ZREM', ik, w[1])
    local lk = B .. ':w:' .. pfx
    rcall('RPUSH', lk, cjson.encode(out))
    rcall('PEXPIRE', lk, lease + 60000)
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
