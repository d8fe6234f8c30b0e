"""Every Lua script, as a named constant with its KEYS/ARGV contract.

Scripts receive every key they touch through KEYS (never built inside Lua), and are
registered once per connection through :class:`Scripts`.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

# Add a shard's work items to the queue stream, in order (one call per batch: a command
# per item cost ingest more CPU in redis-py's command packing than the items' parsing). Each
# image gets a placeholder ("") in the shard's records hash and counts in the shard's
# `pending`: the shard is complete when it is sealed and none of its own images is pending.
# An image that already has a record is not queued again.
# KEYS: 1 queue stream, 2 the shard's records hash, 3 the shard's meta hash
# ARGV: 1 shard, then for item i: image_name, raw_url (2 values each)
# Returns: how many items were added.
ENQUEUE = """
local added, placeholders = 0, 0
for i = 2, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[2], ARGV[i])
  if not cur then
    redis.call('HSET', KEYS[2], ARGV[i], '')
    placeholders = placeholders + 1
  end
  if not cur or cur == '' then
    redis.call('XADD', KEYS[1], '*', 's', ARGV[1], 'n', ARGV[i], 'u', ARGV[i + 1])
    added = added + 1
  end
end
redis.call('HINCRBY', KEYS[3], 'pending', placeholders)
return added
"""

# Record terminal results, at most one per image, and release their queue entries.
# A result from the queue counts only if its entry was still pending (else another holder
# of the same item recorded it first) and only for an image of its shard (one with a
# placeholder); a result for any other image (unknown shard, stray item, shard already
# reported) leaves a dead-letter entry instead, unless it is a dead letter itself (its
# caller writes that entry). A result not from the queue (ingest's bad_url/bad_name) is
# recorded if the image has no record yet. A shard whose meta has no `pending` field was
# enqueued without placeholders (by an earlier version): its results are recorded once per
# image and it completes when `done` reaches `total`.
# KEYS: 1 queue stream, 2 counts hash, 3 errors hash, 4 shards:complete set, 5 dead stream,
#       then for result i: meta hash, records hash (2 keys each)
# ARGV: 1 consumer group, 2 dead stream max length, 3 the dead-letter status, then for result
#       i: stream id ("" when not from the queue), shard, image_name, record JSON, status,
#       stored bytes (6 each)
# Returns: the shards this call completed (sealed, and none of their images pending).
RECORD = """
local completed = {}
local n = (#ARGV - 3) / 6
for i = 0, n - 1 do
  local a = 4 + i * 6
  local id, shard, name, rec, status, nbytes =
    ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local meta, records = KEYS[6 + i * 2], KEYS[7 + i * 2]
  local live = true
  if id ~= '' then
    live = redis.call('XACK', KEYS[1], ARGV[1], id) == 1
    redis.call('XDEL', KEYS[1], id)
    redis.call('HDEL', KEYS[3], id)
  end
  if live then
    local cur = redis.call('HGET', records, name)
    if cur == '' or (not cur and id == '') then
      redis.call('HSET', records, name, rec)
      redis.call('HINCRBY', KEYS[2], status, 1)
      redis.call('HINCRBY', KEYS[2], 'bytes', tonumber(nbytes))
      redis.call('HINCRBY', meta, 'done', 1)
      if cur == '' then
        local pending = redis.call('HINCRBY', meta, 'pending', -1)
        if pending <= 0 and redis.call('HEXISTS', meta, 'total') == 1 then
          redis.call('SADD', KEYS[4], shard)
          completed[#completed + 1] = shard
        end
      end
    elseif not cur and redis.call('EXISTS', meta) == 1
        and redis.call('HEXISTS', meta, 'pending') == 0 then
      redis.call('HSET', records, name, rec)
      redis.call('HINCRBY', KEYS[2], status, 1)
      redis.call('HINCRBY', KEYS[2], 'bytes', tonumber(nbytes))
      local done = redis.call('HINCRBY', meta, 'done', 1)
      local total = redis.call('HGET', meta, 'total')
      if total and tonumber(total) == done then
        redis.call('SADD', KEYS[4], shard)
        completed[#completed + 1] = shard
      end
    elseif not cur and status ~= ARGV[3] then
      local url, err = '', ''
      local ok, decoded = pcall(cjson.decode, rec)
      if ok and type(decoded) == 'table' then
        url, err = tostring(decoded['raw_url'] or ''), tostring(decoded['error'] or '')
      end
      local t = redis.call('TIME')
      redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[2], '*', 's', shard, 'n', name,
        'u', url, 'reason', 'not an image of this shard (unknown shard, stray item, or shard '
          .. 'already reported); its result: ' .. status .. (err ~= '' and (': ' .. err) or ''),
        't', t[1] .. '.' .. string.format('%06d', tonumber(t[2])))
    end
  end
end
return completed
"""

# Seal a shard once every item of it is enqueued: from now on it completes when none of its
# images is pending.
# KEYS: 1 shard meta hash, 2 shards:complete set
# ARGV: 1 shard, 2 total images
# Returns: 1 when the shard is already complete, else 0.
SEAL = """
redis.call('HSET', KEYS[1], 'total', ARGV[2])
if redis.call('HINCRBY', KEYS[1], 'pending', 0) <= 0 then
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

# Re-queue recorded images of the chosen statuses in an open shard (the retry command): each
# record becomes a placeholder again.
# KEYS: 1 records hash, 2 meta hash, 3 queue stream, 4 counts hash, 5 shards:complete set
# ARGV: 1 shard, then image names
# Returns: the number re-queued.
REQUEUE = """
local moved = 0
for i = 2, #ARGV do
  local rec = redis.call('HGET', KEYS[1], ARGV[i])
  if rec and rec ~= '' then
    local ok, decoded = pcall(cjson.decode, rec)
    if ok and type(decoded) == 'table' and type(decoded['raw_url']) == 'string' then
      redis.call('HSET', KEYS[1], ARGV[i], '')
      redis.call('HINCRBY', KEYS[2], 'done', -1)
      redis.call('HINCRBY', KEYS[2], 'pending', 1)
      redis.call('HINCRBY', KEYS[4], tostring(decoded['status']), -1)
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
