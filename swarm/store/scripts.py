"""Lua scripts: every compare-and-set and every fenced write runs atomically inside Redis.

Each script is the shared PRELUDE plus a short body. Node states are decoded and re-encoded
with cjson here, which is why they never carry free-form data (results live in their own
hash, see Keys.results): cjson would turn an empty list into `{}`.

A worker "owns" a node while the node is `running` with the worker's fencing token. Every
fenced script checks that first, so a zombie (a paused worker whose job was reclaimed) and a
worker whose node the coordinator moved on can change nothing.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

PRELUDE = r"""
local function load_node(nodes, id)
  local raw = redis.call('HGET', nodes, id)
  if raw then return cjson.decode(raw) end
  return nil
end

local function save_node(nodes, node, now)
  node.updated_at = tonumber(now)
  local raw = cjson.encode(node)
  redis.call('HSET', nodes, node.id, raw)
  return raw
end

local function emit(events, maxlen, event)
  if type(event) == 'table' then event = cjson.encode(event) end
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'e', event)
end

local function owned(nodes, id, token)
  local node = load_node(nodes, id)
  if node and node.status == 'running' and node.token == tonumber(token) then return node end
  return nil
end

local function drop_job(jobs, group, entry)
  redis.call('XACK', jobs, group, entry)
  redis.call('XDEL', jobs, entry)
end

local function member(json_list, value)
  for _, v in ipairs(cjson.decode(json_list)) do
    if v == value then return true end
  end
  return false
end
"""

# Scripts about one job share a layout, so claim and reclaim build it once:
# KEYS: 1 jobs, 2 nodes, 3 holders, 4 fence, 5 events, 6 dead, 7 done
# ARGV: 1 group, 2 entry, 3 run, 4 node, 5 attempt, 6 consumer, 7 now, 8 maxlen,
#       9 max_deliveries, 10 job JSON
JOB_PRELUDE = r"""
-- The node this job is still meant to run, or nil when the job is stale: the node moved to
-- another attempt, settled, or is running under a different entry (a duplicate job).
local function current(K, A)
  local node = load_node(K[2], A[4])
  if not node or node.attempt ~= tonumber(A[5]) then return nil end
  if node.status == 'queued' then return node end
  if node.status ~= 'running' then return nil end
  local holder = redis.call('HGET', K[3], A[4])
  if holder and holder ~= A[2] then return nil end
  return node
end

-- Tokens never go back, even when Redis restarts having lost its last second of writes
-- (appendfsync everysec): the counter is floored at the server clock in ms, so a claim made
-- after a restart cannot be handed a token some zombie already holds.
local function next_token(fence)
  local t = redis.call('TIME')
  local floor = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local token = redis.call('INCR', fence)
  if token < floor then
    token = floor
    redis.call('SET', fence, floor)
  end
  return token
end

-- Whether this consumer still holds the job's delivery. A worker paused between reading a
-- job (XREADGROUP / XAUTOCLAIM) and starting it may find on waking that another worker
-- reclaimed the very same entry and started it: the entry and the node then look exactly
-- as they do for its own start, so only the delivery's owner tells them apart.
local function delivered_to(K, A)
  local p = redis.call('XPENDING', K[1], A[1], A[2], A[2], 1)[1]
  if not p then return nil end
  if p[2] ~= A[6] then return false end
  return tonumber(p[4])
end

local function start(K, A, node, deliveries)
  local was, previous = node.status, node.worker
  local token = next_token(K[4])
  node.status, node.token, node.worker = 'running', token, A[6]
  save_node(K[2], node, A[7])
  redis.call('HSET', K[3], A[4], A[2])
  local at = tonumber(A[7])
  if was ~= 'running' then
    emit(K[5], A[8], {type='node_status', run=A[3], node=A[4], status='running',
                      attempt=node.attempt, at=at})
  else
    if type(previous) ~= 'string' then previous = '?' end
    emit(K[5], A[8], {type='log', run=A[3], node=A[4], level='warning', at=at,
      message='reclaimed from ' .. previous .. ' by ' .. A[6] .. ', delivery ' .. deliveries})
  end
  return token
end
"""

START = r"""
if not delivered_to(KEYS, ARGV) then return 0 end  -- reclaimed while this worker was paused
local node = current(KEYS, ARGV)
if not node then
  drop_job(KEYS[1], ARGV[1], ARGV[2])
  return 0
end
return start(KEYS, ARGV, node, 1)
"""

# Returns {token, deliveries}; token 0 = stale or gone, -1 = dead-lettered.
RECLAIM = r"""
local n = delivered_to(KEYS, ARGV)
if not n then return {0, 0} end  -- gone, or claimed again by another worker since
local node = current(KEYS, ARGV)
if not node then
  drop_job(KEYS[1], ARGV[1], ARGV[2])
  return {0, n}
end
if n <= tonumber(ARGV[9]) then return {start(KEYS, ARGV, node, n), n} end
local reason = 'delivered ' .. n .. ' times; last holder stopped heartbeating'
local at = tonumber(ARGV[7])
redis.call('XADD', KEYS[6], '*', 'job', ARGV[10], 'reason', reason, 'entry', ARGV[2],
           'deliveries', n, 'at', ARGV[7])
drop_job(KEYS[1], ARGV[1], ARGV[2])
node.status, node.error = 'dead', reason
save_node(KEYS[2], node, ARGV[7])
redis.call('HDEL', KEYS[3], ARGV[4])
redis.call('XADD', KEYS[7], '*', 'c', cjson.encode({run=ARGV[3], node=ARGV[4],
           attempt=node.attempt, status='dead', error=reason}))
emit(KEYS[5], ARGV[8], {type='node_status', run=ARGV[3], node=ARGV[4], status='dead',
                        attempt=node.attempt, reason=reason, at=at})
return {-1, n}
"""

# KEYS: 1 nodes, 2 jobs. ARGV: 1 node, 2 token, 3 group, 4 entry
# XCLAIM ... JUSTID resets the entry's idle time without bumping its delivery count; the
# owner's consumer name is the node's `worker`, set when the token was handed out.
HEARTBEAT = r"""
local node = owned(KEYS[1], ARGV[1], ARGV[2])
if not node then return 0 end
redis.call('XCLAIM', KEYS[2], ARGV[3], node.worker, 0, ARGV[4], 'JUSTID')
return 1
"""

# KEYS: 1 nodes, 2 steps, 3 events, 4 run. ARGV: 1 node, 2 token, 3 now, 4 maxlen, 5 step,
#   6 event, 7 tokens_in, 8 tokens_out, 9 llm_calls, 10 steps, 11 cost_usd
# A step identical to the last one recorded is the same call retried by redis-py after its
# connection broke (the reply was lost, not the write): recorded and charged once.
# Returns 0 when fenced out, else the run's usage totals (HMGET order of `totals`).
APPEND_STEP = r"""
local node = owned(KEYS[1], ARGV[1], ARGV[2])
if not node then return 0 end
local totals = {'tokens_in', 'tokens_out', 'llm_calls', 'steps', 'cost_usd'}
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
if last and last[2][2] == ARGV[5] then return redis.call('HMGET', KEYS[4], unpack(totals)) end
redis.call('XADD', KEYS[2], '*', 's', ARGV[5])
node.steps = node.steps + tonumber(ARGV[10])  -- LLM turns, not records (tools add none)
-- The step's spend lands on the node and the run in the same write, so budgets and the
-- TUI see it live and a crash can never record a step without charging it.
local names = {'tokens_in', 'tokens_out', 'llm_calls', 'steps'}
node.usage = node.usage or {}
for i, name in ipairs(names) do
  local n = tonumber(ARGV[6 + i])
  if n ~= 0 then
    node.usage[name] = (node.usage[name] or 0) + n
    redis.call('HINCRBY', KEYS[4], name, n)
  end
end
local cost = tonumber(ARGV[11])
if cost ~= 0 then
  node.usage.cost_usd = (node.usage.cost_usd or 0) + cost
  redis.call('HINCRBYFLOAT', KEYS[4], 'cost_usd', ARGV[11])
end
save_node(KEYS[1], node, ARGV[3])
if ARGV[6] ~= '' then emit(KEYS[3], ARGV[4], ARGV[6]) end
-- The run's totals after this charge: the writer learns at once that a budget is reached,
-- instead of running on a stale view until its next refresh.
return redis.call('HMGET', KEYS[4], unpack(totals))
"""

# KEYS: 1 nodes, 2 steps. ARGV: 1 node, 2 token, 3.. steps
REPLACE_STEPS = r"""
if not owned(KEYS[1], ARGV[1], ARGV[2]) then return 0 end
redis.call('DEL', KEYS[2])
for i = 3, #ARGV do redis.call('XADD', KEYS[2], '*', 's', ARGV[i]) end
return 1
"""

# KEYS: 1 nodes, 2 results, 3 holders, 4 done, 5 jobs, 6 events
# ARGV: 1 node, 2 token, 3 now, 4 maxlen, 5 group, 6 entry, 7 status, 8 error JSON,
#       9 usage JSON, 10 result JSON or '', 11 completion JSON, 12 event JSON
# Returns 1 recorded, 2 already recorded by this very claim (a retried call), 0 fenced out.
COMPLETE = r"""
local node = load_node(KEYS[1], ARGV[1])
if not node or node.token ~= tonumber(ARGV[2]) then return 0 end
if node.status == ARGV[7] then
  drop_job(KEYS[5], ARGV[5], ARGV[6])
  return 2
end
if node.status ~= 'running' then return 0 end
node.status, node.error, node.usage = ARGV[7], cjson.decode(ARGV[8]), cjson.decode(ARGV[9])
save_node(KEYS[1], node, ARGV[3])
if ARGV[10] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[10])
else
  redis.call('HDEL', KEYS[2], ARGV[1])
end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('XADD', KEYS[4], '*', 'c', ARGV[11])
drop_job(KEYS[5], ARGV[5], ARGV[6])
emit(KEYS[6], ARGV[4], ARGV[12])
return 1
"""

# A node no worker holds (a nested swarm) finishing: CAS on (attempt, running).
# KEYS: 1 nodes, 2 results, 3 done, 4 events
# ARGV: 1 node, 2 attempt, 3 now, 4 maxlen, 5 status, 6 error JSON, 7 usage JSON,
#       8 result JSON or '', 9 completion JSON, 10 event JSON
FINISH_NODE = r"""
local node = load_node(KEYS[1], ARGV[1])
if not node or node.attempt ~= tonumber(ARGV[2]) or node.status ~= 'running' then return 0 end
node.status, node.error, node.usage = ARGV[5], cjson.decode(ARGV[6]), cjson.decode(ARGV[7])
save_node(KEYS[1], node, ARGV[3])
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[8])
else
  redis.call('HDEL', KEYS[2], ARGV[1])
end
redis.call('XADD', KEYS[3], '*', 'c', ARGV[9])
emit(KEYS[4], ARGV[4], ARGV[10])
return 1
"""

# KEYS: 1 nodes, 2 holders, 3 jobs, 4 events
# ARGV: 1 node, 2 token, 3 now, 4 maxlen, 5 group, 6 entry, 7 job JSON, 8 event JSON
RELEASE = r"""
local node = owned(KEYS[1], ARGV[1], ARGV[2])
if not node then return false end
node.status, node.token, node.worker = 'queued', 0, cjson.null
save_node(KEYS[1], node, ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[1])
drop_job(KEYS[3], ARGV[5], ARGV[6])
local entry = redis.call('XADD', KEYS[3], '*', 'job', ARGV[7])
emit(KEYS[4], ARGV[4], ARGV[8])
return entry
"""

# KEYS: 1 nodes, 2 results, 3 events, 4 jobs
# ARGV: 1 node, 2 expect_attempt, 3 expect_statuses JSON, 4 changes JSON,
#       5 result mode keep|set|clear, 6 result JSON, 7 now, 8 maxlen, 9 event JSON,
#       10 job JSON or '' (enqueued in the same step: a node is never `queued` without a job)
TRANSITION = r"""
local node = load_node(KEYS[1], ARGV[1])
if not node or node.attempt ~= tonumber(ARGV[2]) then return false end
if not member(ARGV[3], node.status) then return false end
local was = node.status
for k, v in pairs(cjson.decode(ARGV[4])) do node[k] = v end
local raw = save_node(KEYS[1], node, ARGV[7])
if ARGV[5] == 'set' then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[6])
elseif ARGV[5] == 'clear' then
  redis.call('HDEL', KEYS[2], ARGV[1])
end
if ARGV[10] ~= '' then redis.call('XADD', KEYS[4], '*', 'job', ARGV[10]) end
if node.status ~= was and ARGV[9] ~= '' then emit(KEYS[3], ARGV[8], ARGV[9]) end
return {raw, redis.call('HGET', KEYS[2], ARGV[1])}
"""

# KEYS: 1 run, 2 runs, 3 events. ARGV: 1 run id, 2 created_at, 3 maxlen, 4 event, 5.. pairs
CREATE_RUN = r"""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
emit(KEYS[3], ARGV[3], ARGV[4])
return 1
"""

# KEYS: 1 run, 2 events
# ARGV: 1 status, 2 expect JSON or '', 3 error JSON, 4 summary JSON, 5 now, 6 terminal 1|0,
#       7 maxlen, 8 event JSON. Returns -1 unknown run, 0 expectation failed, 1 applied.
SET_RUN_STATUS = r"""
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return -1 end
if ARGV[2] ~= '' and not member(ARGV[2], cur) then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[5])
if ARGV[6] == '1' then
  redis.call('HSETNX', KEYS[1], 'finished_at', ARGV[5])
else
  redis.call('HDEL', KEYS[1], 'finished_at')
end
local err, summary = cjson.decode(ARGV[3]), cjson.decode(ARGV[4])
if type(err) == 'string' then redis.call('HSET', KEYS[1], 'error', err) end
if type(summary) == 'string' then redis.call('HSET', KEYS[1], 'result_summary', summary) end
if cur ~= ARGV[1] then emit(KEYS[2], ARGV[7], ARGV[8]) end
return 1
"""

# Leases. KEYS: 1 lease. ARGV: 1 owner, 2 ttl ms. Re-acquiring one's own lease renews it.
ACQUIRE_LEASE = r"""
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

RENEW_LEASE = r"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

RELEASE_LEASE = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


class Script:
    """A registered script that outlives Redis restarts. redis-py loads a script the server
    lost (a restarted Redis starts with none) once per call; when the server restarts again
    between that load and the call (its retry rode out the outage), the call fails with
    NoScriptError: load again, a few times."""

    TRIES = 4

    def __init__(self, script: AsyncScript) -> None:
        self.script = script

    async def __call__(self, keys: list[Any] | None = None, args: list[Any] | None = None,
                       client: Any = None) -> Any:
        for attempt in range(1, self.TRIES + 1):
            try:
                return await self.script(keys=keys, args=args, client=client)
            except NoScriptError:
                if attempt == self.TRIES:
                    raise
        raise AssertionError("unreachable")


class Scripts:
    """The registered scripts of one client (EVALSHA, reloaded after a restart)."""

    def __init__(self, r: Redis) -> None:
        def reg(body: str, *preludes: str) -> Script:
            return Script(r.register_script("".join((PRELUDE, *preludes, body))))

        self.start = reg(START, JOB_PRELUDE)
        self.reclaim = reg(RECLAIM, JOB_PRELUDE)
        self.heartbeat = reg(HEARTBEAT)
        self.append_step = reg(APPEND_STEP)
        self.replace_steps = reg(REPLACE_STEPS)
        self.complete = reg(COMPLETE)
        self.finish_node = reg(FINISH_NODE)
        self.release = reg(RELEASE)
        self.transition = reg(TRANSITION)
        self.create_run = reg(CREATE_RUN)
        self.set_run_status = reg(SET_RUN_STATUS)
        self.acquire_lease = reg(ACQUIRE_LEASE)
        self.renew_lease = reg(RENEW_LEASE)
        self.release_lease = reg(RELEASE_LEASE)
