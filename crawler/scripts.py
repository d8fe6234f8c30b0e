"""Every Lua script, as a named constant with its KEYS/ARGV contract.

Scripts receive every key they touch through KEYS (never built inside Lua), and are
registered once per connection through :class:`Scripts`.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

# Add a shard's work items to the queue stream, in order (one call per batch: a command
# per item cost ingest more CPU in redis-py's command packing than the items' parsing).
# KEYS: 1 queue stream
# ARGV: 1 shard, then for item i: image_name, raw_url (2 values each)
# Returns: how many items were added.
ENQUEUE = """
for i = 2, #ARGV, 2 do
  redis.call('XADD', KEYS[1], '*', 's', ARGV[1], 'n', ARGV[i], 'u', ARGV[i + 1])
end
return (#ARGV - 1) / 2
"""

# Record terminal results, at most one per image, and release their queue entries.
# KEYS: 1 queue stream, 2 counts hash, 3 errors hash, 4 shards:complete set,
#       then for result i: meta hash, records hash (2 keys each)
# ARGV: 1 consumer group, then for result i: stream id ("" when not from the queue),
#       shard, image_name, record JSON, status, stored bytes (6 values each)
# Returns: the shards this call completed (every image recorded and the shard sealed).
RECORD = """
local completed = {}
local n = (#ARGV - 1) / 6
for i = 0, n - 1 do
  local a = 2 + i * 6
  local id, shard, name, rec, status, nbytes =
    ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local meta, records = KEYS[5 + i * 2], KEYS[6 + i * 2]
  if redis.call('HSETNX', records, name, rec) == 1 then
    redis.call('HINCRBY', KEYS[2], status, 1)
    redis.call('HINCRBY', KEYS[2], 'bytes', tonumber(nbytes))
    local done = redis.call('HINCRBY', meta, 'done', 1)
    local total = redis.call('HGET', meta, 'total')
    if total and tonumber(total) == done then
      redis.call('SADD', KEYS[4], shard)
      completed[#completed + 1] = shard
    end
  end
  if id ~= '' then
    redis.call('XACK', KEYS[1], ARGV[1], id)
    redis.call('XDEL', KEYS[1], id)
    redis.call('HDEL', KEYS[3], id)
  end
end
return completed
"""

# Seal a shard once every item of it is enqueued: from now on it completes when done == total.
# KEYS: 1 shard meta hash, 2 shards:complete set
# ARGV: 1 shard, 2 total images
# Returns: 1 when the shard is already complete, else 0.
SEAL = """
redis.call('HSET', KEYS[1], 'total', ARGV[2])
local done = tonumber(redis.call('HGET', KEYS[1], 'done') or '0')
if done >= tonumber(ARGV[2]) then
  redis.call('SADD', KEYS[2], ARGV[1])
  return 1
end
return 0
"""

# Reserve start times for requests to hosts, fleet-wide (GCRA, one key per host).
# KEYS: host limit keys
# ARGV: 1 emission interval ms, 2 burst tolerance ms, then a request count per key
# Returns: for each key, the delays (ms from now) at which its reserved requests may start.
GCRA_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval, tau = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local delays = {}
  for j = 1, tonumber(ARGV[2 + i]) do
    local start = tat - tau
    if start < now then start = now end
    delays[j] = start - now
    tat = math.max(tat, start) + interval
  end
  redis.call('SET', key, tat, 'PX', math.floor(tat - now + interval + tau) + 1000)
  out[i] = delays
end
return out
"""

# Push a host's next allowed start at least delay ms into the future (Retry-After).
# KEYS: 1 host limit key
# ARGV: 1 delay ms
GCRA_PENALIZE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < until_ms then
  redis.call('SET', KEYS[1], until_ms, 'PX', tonumber(ARGV[1]) + 1000)
end
return 1
"""

# Move deferred items whose time has come back into the queue.
# KEYS: 1 deferred zset, 2 queue stream
# ARGV: 1 maximum items to move
# Returns: the number moved.
PROMOTE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  local s, n, u = string.match(member, '^([^\\n]*)\\n([^\\n]*)\\n(.*)$')
  if s then
    redis.call('XADD', KEYS[2], '*', 's', s, 'n', n, 'u', u)
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""

# Defer leased items (busy host): into the deferred set, due `delay` ms from now by Redis's
# clock (the one PROMOTE reads), and out of the stream.
# KEYS: 1 deferred zset, 2 queue stream
# ARGV: 1 consumer group, 2 delay ms, then per item: stream id, member (2 each)
DEFER = """
local t = redis.call('TIME')
local due = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
for i = 3, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], due, ARGV[i + 1])
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[i])
  redis.call('XDEL', KEYS[2], ARGV[i])
end
return (#ARGV - 2) / 2
"""

# Hand items back to the queue (graceful shutdown, deferral): re-add, then release the lease.
# KEYS: 1 queue stream
# ARGV: 1 consumer group, then per item: stream id, shard, image_name, raw_url (4 each)
HAND_BACK = """
for i = 2, #ARGV, 4 do
  redis.call('XADD', KEYS[1], '*', 's', ARGV[i + 1], 'n', ARGV[i + 2], 'u', ARGV[i + 3])
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  redis.call('XDEL', KEYS[1], ARGV[i])
end
return (#ARGV - 1) / 4
"""

# Re-queue recorded images of the chosen statuses in an open shard (the retry command).
# KEYS: 1 records hash, 2 meta hash, 3 queue stream, 4 counts hash, 5 shards:complete set
# ARGV: 1 shard, then image names
# Returns: the number re-queued.
REQUEUE = """
local moved = 0
for i = 2, #ARGV do
  local rec = redis.call('HGET', KEYS[1], ARGV[i])
  if rec then
    local ok, decoded = pcall(cjson.decode, rec)
    if ok then
      redis.call('HDEL', KEYS[1], ARGV[i])
      redis.call('HINCRBY', KEYS[2], 'done', -1)
      redis.call('HINCRBY', KEYS[4], decoded['status'], -1)
      redis.call('XADD', KEYS[3], '*', 's', ARGV[1], 'n', ARGV[i], 'u', decoded['raw_url'])
      moved = moved + 1
    end
  end
end
if moved > 0 then redis.call('SREM', KEYS[5], ARGV[1]) end
return moved
"""


class Scripts:
    """The project's Lua scripts registered on one client (EVALSHA, reloaded on NOSCRIPT)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.enqueue = client.register_script(ENQUEUE)
        self.record = client.register_script(RECORD)
        self.seal = client.register_script(SEAL)
        self.gcra_reserve = client.register_script(GCRA_RESERVE)
        self.gcra_penalize = client.register_script(GCRA_PENALIZE)
        self.promote = client.register_script(PROMOTE)
        self.defer = client.register_script(DEFER)
        self.hand_back = client.register_script(HAND_BACK)
        self.requeue = client.register_script(REQUEUE)


def as_list(value: Any) -> list[Any]:
    return list(value) if value else []
