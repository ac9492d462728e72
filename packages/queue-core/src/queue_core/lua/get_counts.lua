-- Job counts by state, in one consistent snapshot.
-- KEYS[1] B:meta   ARGV[1] B
-- Returns {waiting, prioritized, delayed, active, completed, failed, waiting_children, paused,
--          groups, grouped_waiting, dead-letter queue's waiting jobs (-1: no DLQ)}. `waiting`
-- includes jobs waiting inside groups.
local B = ARGV[1]
local wk = B .. ':wait'
local total = rcall('ZCARD', wk)
local prio0 = rcall('ZCOUNT', wk, '-inf', string.format('(%.0f', PB))
local gw = tonumber(rcall('GET', B .. ':gw')) or 0
local meta = rcall('HMGET', B .. ':meta', 'paused', 'dlq')
local paused = 0
if meta[1] == '1' then paused = 1 end
local dlq = -1
if meta[2] then dlq = rcall('ZCARD', meta[2] .. ':wait') end
return { prio0 + gw, total - prio0, rcall('ZCARD', B .. ':delayed'), rcall('ZCARD', B .. ':active'),
  rcall('ZCARD', B .. ':completed'), rcall('ZCARD', B .. ':failed'), rcall('ZCARD', B .. ':wc'),
  paused, rcall('ZCARD', B .. ':groups'), gw, dlq }
