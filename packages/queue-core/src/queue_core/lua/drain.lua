-- Remove waiting jobs (ungrouped and grouped; delayed ones too when asked), never active,
-- finished or waiting-children ones. Works in batches; call until it returns 0 remaining.
-- KEYS[1] B:meta   ARGV[1] B   ARGV[2] include delayed (0/1)   ARGV[3] batch size
-- Returns {removed, remaining}.
local B = ARGV[1]
local with_delayed = ARGV[2] == '1'
local limit = tonumber(ARGV[3])
local M = meta_of(B)
local removed = 0
local function drop(ids)
  for i = 1, #ids do
    local jk = B .. ':j:' .. ids[i]
    local dd = rcall('HGET', jk, 'ddk')
    if dd and rcall('GET', B .. ':de:' .. dd) == ids[i] then rcall('DEL', B .. ':de:' .. dd) end
    delete_job_keys(B, ids[i])
  end
  removed = removed + #ids
end
local wk = B .. ':wait'
local ids = rcall('ZRANGE', wk, 0, limit - 1)
if #ids > 0 then
  rcall('ZREM', wk, unpack(ids))
  drop(ids)
end
if rcall('ZCARD', wk) == 0 then rcall('DEL', B .. ':pseq') end
if with_delayed and removed < limit then
  local d = rcall('ZRANGE', B .. ':delayed', 0, limit - removed - 1)
  if #d > 0 then
    rcall('ZREM', B .. ':delayed', unpack(d))
    drop(d)
  end
end
if removed < limit then
  local groups = rcall('ZRANGE', B .. ':groups', 0, -1)
  for _, gid in ipairs(groups) do
    if removed >= limit then break end
    local gl = B .. ':g:' .. gid
    local gids = rcall('LRANGE', gl, 0, limit - removed - 1)
    if #gids > 0 then
      rcall('LTRIM', gl, #gids, -1)
      rcall('DECRBY', B .. ':gw', #gids)
      drop(gids)
    end
    group_sync(B, M, gid)
  end
end
local remaining = rcall('ZCARD', wk) + (tonumber(rcall('GET', B .. ':gw')) or 0)
if with_delayed then remaining = remaining + rcall('ZCARD', B .. ':delayed') end
if remaining <= 0 then rcall('DEL', B .. ':gw') end
return { removed, remaining }
