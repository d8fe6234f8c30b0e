"""Every Redis key the project uses, built in one place.

Layout (``ns`` is ``redis.namespace``, default ``mmc4``):

=================================  ======  ==================================================
key                                type    holds
=================================  ======  ==================================================
``ns:q``                           stream  work items {s: shard, n: image_name, u: raw_url};
                                           consumer group ``crawl``; entries are deleted
                                           when their result is recorded
``ns:deferred``                    zset    items held back for a busy host, scored by the
                                           time (ms) they may run again
``ns:errors``                      hash    stream id -> last error of an item that failed
                                           without a result (reason for its dead letter)
``ns:dead``                        stream  dead letters {s, n, u, reason, t}: items
                                           delivered max_deliveries times, poison entries,
                                           results for images their shard does not have
``ns:shard:<shard>:meta``          hash    source, lines, docs, bad_lines, images, total
                                           (set when the shard is fully enqueued), done,
                                           pending (images queued and not yet recorded),
                                           ingest_line (resume point), flagged_duplicates,
                                           skipped_duplicates, unreadable (why reading
                                           ended early)
``ns:shard:<shard>:ingest-lock``   string  lock (redis-py Lock) of the process enqueueing
                                           the shard; renewed while it holds the shard
``ns:shard:<shard>:finalize-lock`` string  lock (redis-py Lock) of the process writing the
                                           shard's report (expires after 300 s)
``ns:shard:<shard>:records``       hash    image_name -> terminal status record (JSON), or
                                           "" while the image is queued (only these images
                                           are the shard's); moved to
                                           OUTPUT/_status/<shard>.jsonl.gz when the shard
                                           completes
``ns:shards:open``                 set     shards with items in flight
``ns:shards:complete``             set     shards whose every image has a record, waiting
                                           for their report to be written
``ns:shards:done``                 stream  completed shards {shard, source, report} for the
                                           assignment worker (consumer group ``assign``)
``ns:counts``                      hash    live counters: status -> images, plus bytes
``ns:ingest:errors``               hash    ingest error kind -> count
``ns:limit:<host>``                string  GCRA theoretical arrival time (ms) of a host
``ns:worker:<id>``                 hash    heartbeat of one worker process (expires)
``ns:history``                     list    [time, done, queued] samples for rate and ETA
``ns:history:turn``                string  id of the worker taking the next sample (expires
                                           after 9.5 s: one sample per 10 s in a fleet)
``ns:hosts:failed``                zset    host -> failed images (top 10,000 kept)
``ns:hosts:gone``                  zset    host -> images that answered 404 or 410
                                           (permanent failures; top 10,000 kept)
``ns:plan:shards``                 set     every shard given to ingest (`run`, `enqueue`):
                                           the whole crawl, for progress and ETA
``ns:shards:reported``             set     shards whose report is written
``mmc4:embedded:identity``         string  random token of the data directory whose embedded
                                           Redis this is (outside every namespace)
=================================  ======  ==================================================
"""

from __future__ import annotations

from dataclasses import dataclass

CRAWL_GROUP = "crawl"
ASSIGN_GROUP = "assign"
EMBEDDED_IDENTITY = "mmc4:embedded:identity"


@dataclass(frozen=True)
class Keys:
    ns: str = "mmc4"

    @property
    def queue(self) -> str:
        return f"{self.ns}:q"

    @property
    def deferred(self) -> str:
        return f"{self.ns}:deferred"

    @property
    def errors(self) -> str:
        return f"{self.ns}:errors"

    @property
    def dead(self) -> str:
        return f"{self.ns}:dead"

    def shard_meta(self, shard: str) -> str:
        return f"{self.ns}:shard:{shard}:meta"

    def shard_ingest_lock(self, shard: str) -> str:
        """Held (with a TTL) by the one process enqueueing a shard."""
        return f"{self.ns}:shard:{shard}:ingest-lock"

    def shard_finalize_lock(self, shard: str) -> str:
        """Held (with a TTL) by the one process writing a shard's report."""
        return f"{self.ns}:shard:{shard}:finalize-lock"

    def shard_records(self, shard: str) -> str:
        return f"{self.ns}:shard:{shard}:records"

    @property
    def shards_open(self) -> str:
        return f"{self.ns}:shards:open"

    @property
    def shards_complete(self) -> str:
        return f"{self.ns}:shards:complete"

    @property
    def shards_done(self) -> str:
        return f"{self.ns}:shards:done"

    @property
    def counts(self) -> str:
        return f"{self.ns}:counts"

    @property
    def ingest_errors(self) -> str:
        return f"{self.ns}:ingest:errors"

    def host_limit(self, host: str) -> str:
        return f"{self.ns}:limit:{host}"

    def worker(self, worker_id: str) -> str:
        return f"{self.ns}:worker:{worker_id}"

    @property
    def worker_pattern(self) -> str:
        return f"{self.ns}:worker:*"

    def assign_worker(self, worker_id: str) -> str:
        """Heartbeat of an assignment worker (hash: host, pid, seen, shard; with a TTL)."""
        return f"{self.ns}:assign-worker:{worker_id}"

    @property
    def assign_worker_pattern(self) -> str:
        return f"{self.ns}:assign-worker:*"

    @property
    def history(self) -> str:
        return f"{self.ns}:history"

    @property
    def history_turn(self) -> str:
        return f"{self.ns}:history:turn"

    @property
    def hosts_failed(self) -> str:
        return f"{self.ns}:hosts:failed"

    @property
    def hosts_gone(self) -> str:
        return f"{self.ns}:hosts:gone"

    @property
    def plan_shards(self) -> str:
        return f"{self.ns}:plan:shards"

    @property
    def shards_reported(self) -> str:
        return f"{self.ns}:shards:reported"

    @property
    def all_pattern(self) -> str:
        """SCAN pattern of every key of this namespace (`clear` deletes them)."""
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in self.ns)
        return f"{escaped}:*"
