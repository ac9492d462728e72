-- Remove up to `limit` jobs of one state that are older than the grace period.
-- KEYS[1] B:meta   ARGV[1] B   ARGV[2] state   ARGV[3] grace ms   ARGV[4] limit
-- completed/failed are aged by finish time, the others by creation time. Active jobs hold a
-- lease and are never cleaned. Returns the removed ids.
local B, state, grace, limit = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local cutoff = now - grace
local M = meta_of(B)
local out = {}
local function drop(id)
  local jk = B .. ':j:' .. id
  local dd = rcall('HGET', jk, 'ddk')
  if dd and rcall('GET', B .. ':de:' .. dd) == id then rcall('DEL', B .. ':de:' .. dd) end
  delete_job_keys(B, id)
  rcall('DEL', B .. ':deps:' .. id, B .. ':cres:' .. id, B .. ':cfail:' .. id)
  out[#out + 1] = id
end
if state == 'completed' or state == 'failed' then
  local sk = B .. ':' .. state
  -- scores carry a sub-ms offset (finishing order within a ms): a job finished in the cutoff's
  -- own ms scores just above it and must still count as old enough
  local ids = rcall('ZRANGEBYSCORE', sk, '-inf', '(' .. (cutoff + 1), 'LIMIT', 0, limit)
  if #ids > 0 then rcall('ZREM', sk, unpack(ids)) end
  for _, id in ipairs(ids) do drop(id) end
elseif state == 'delayed' or state == 'waiting-children' then
  local sk = B .. ':' .. (state == 'delayed' and 'delayed' or 'wc')
  local ids = rcall('ZRANGE', sk, 0, -1)
  for _, id in ipairs(ids) do
    if #out >= limit then break end
    local ts = tonumber(rcall('HGET', B .. ':j:' .. id, 'ts')) or 0
    if ts <= cutoff then
      rcall('ZREM', sk, id)
      drop(id)
    end
  end
elseif state == 'waiting' or state == 'prioritized' then
  local wk = B .. ':wait'
  local lo, hi = '-inf', string.format('(%.0f', PB)
  if state == 'prioritized' then lo, hi = string.format('%.0f', PB), '+inf' end
  local ids = rcall('ZRANGEBYSCORE', wk, lo, hi)
  for _, id in ipairs(ids) do
    if #out >= limit then break end
    local ts = tonumber(rcall('HGET', B .. ':j:' .. id, 'ts')) or 0
    if ts <= cutoff then
      rcall('ZREM', wk, id)
      drop(id)
    end
  end
  if state == 'waiting' then
    for _, gid in ipairs(rcall('ZRANGE', B .. ':groups', 0, -1)) do
      if #out >= limit then break end
      local gl = B .. ':g:' .. gid
      for _, id in ipairs(rcall('LRANGE', gl, 0, -1)) do
        if #out >= limit then break end
        local ts = tonumber(rcall('HGET', B .. ':j:' .. id, 'ts')) or 0
        if ts <= cutoff then
          rcall('LREM', gl, 1, id)
          rcall('DECR', B .. ':gw')
          drop(id)
        end
      end
      group_sync(B, M, gid)
    end
  end
else
  return redis.error_reply('ERR clean: unsupported state ' .. state)
end
if #out > 0 then emit(B, M, 'e', 'cleaned', 'state', state, 'count', #out) end
return out
