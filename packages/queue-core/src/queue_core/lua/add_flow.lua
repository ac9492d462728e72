-- Add a flow: a tree of jobs where each parent starts only after its children finish.
-- KEYS[1] root queue's B:meta (routing; every queue of a flow shares one hash tag)
-- ARGV[1] msgpack array of nodes in pre-order, each {B, parent index (0 = root), policy,
--         job array (as in add_jobs), number of children}. The policy says what a child's
--         final failure does to its parent: 'fail' (the parent fails), 'ignore' (counts as
--         done, recorded in cfail), 'continue' (the parent starts at once).
-- Returns the job ids in the same order, or an error when a given job id already exists.
local nodes = cmsgpack.unpack(ARGV[1])
local now = now_ms()
for _, n in ipairs(nodes) do
  local jid = n[4][1]
  if jid ~= '' and rcall('EXISTS', n[1] .. ':j:' .. jid) == 1 then
    return redis.error_reply('ERR add_flow: job id ' .. jid .. ' already exists')
  end
end
local metas = {}
local ids = {}
for i, n in ipairs(nodes) do
  local B, parent, policy, a, nchildren = n[1], n[2], n[3], n[4], n[5]
  local M = metas[B]
  if not M then
    M = meta_of(B)
    metas[B] = M
  end
  local fields = a[12]
  if parent > 0 then
    fields[#fields + 1] = 'pid'
    fields[#fields + 1] = ids[parent]
    fields[#fields + 1] = 'pb'
    fields[#fields + 1] = nodes[parent][1]
    fields[#fields + 1] = 'pfp'
    fields[#fields + 1] = policy
  end
  local delay, ready_at = a[3], a[4]
  if ready_at <= 0 and delay > 0 then ready_at = now + delay end
  local r = add_one(B, M, now, {
    id = a[1], prio = a[2], ready_at = ready_at, lifo = a[5] == 1, gid = a[6], weight = a[7],
    gmax = a[8], ddid = '', ddttl = 0, ddmode = '', fields = fields, hold = nchildren > 0,
  })
  ids[i] = r[1]
  if parent > 0 then
    rcall('SADD', nodes[parent][1] .. ':deps:' .. ids[parent], B .. '|' .. r[1])
  end
end
flush_wakes(now)
return ids
