"""The entries of the work queue's stream: an entry parsed and checked into a work `Item`, or
`Poison` naming why it cannot be worked on; and a `Result` as the RECORD script takes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from yarl import URL

from core import status
from core.guard import ANY_ADDRESS, parse_url
from core.shardfiles import check_image_name, check_shard_id
from core.status import Record, Status


class Result(NamedTuple):
    """An image's record as RECORD takes it (in this order)."""

    id: str  # the item's stream id ("" for a record made at ingest)
    shard: str
    name: str
    record: bytes  # the Record's JSON
    status: Status
    bytes: int  # stored bytes


@dataclass(frozen=True, slots=True)
class Item:
    id: str
    shard: str
    name: str
    url: str
    target: URL  # `url` parsed (once per item: the worker and the fetcher use this)


def encode_result(item_id: str, shard: str, name: str, rec: Record) -> Result:
    return Result(item_id, shard, name, status.encode(rec), rec.status, rec.bytes)


@dataclass(frozen=True, slots=True)
class Poison:
    """A stream entry that cannot be worked on, and why.

    `status` is ``bad_name`` or ``bad_url`` when the entry still names an image of a usable
    shard (then it gets that terminal record), else ``dead_letter`` (then only a dead-letter
    entry: there is no shard to record it in). `fields` are the entry's fields as printable
    text, for the dead-letter entry.
    """

    id: str
    status: Status
    reason: str
    fields: dict[str, str]
    shard: str = ""
    name: str = ""
    url: str = ""


def printable(value: Any) -> str:
    """Any reply value as text that encodes anywhere (bad UTF-8 as backslash escapes)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def parse_entry(entry_id: Any, fields: dict[Any, Any]) -> Item | Poison:
    """A raw stream entry as a work item, or as poison with the reason (never raises)."""
    # The checks are ingest's own (core.shardfiles): the same rules at both ends.

    item_id = printable(entry_id)
    shown = {printable(k): printable(v)[:1000] for k, v in fields.items()}
    values: dict[str, str] = {}
    for key in ("s", "n", "u"):
        raw = fields.get(key.encode(), fields.get(key))
        if raw is None:
            return Poison(item_id, status.DEAD_LETTER, f"field {key!r} is missing", shown)
        try:
            values[key] = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError:
            return Poison(item_id, status.DEAD_LETTER, f"field {key!r} is not UTF-8", shown)
    shard, name, url = values["s"], values["n"], values["u"]
    problem = check_shard_id(shard)
    if problem:
        return Poison(item_id, status.DEAD_LETTER, problem, shown)
    problem = check_image_name(name)
    if problem:
        return Poison(item_id, status.BAD_NAME, problem, shown, shard, name, url)
    # The URL's shape; its address is judged by the fetcher under the worker's policy.
    target = parse_url(url, ANY_ADDRESS)
    if isinstance(target, tuple):
        return Poison(item_id, status.BAD_URL, target[1], shown, shard, name, url)
    return Item(item_id, shard, name, url, target)


def dead_letter(item: Item, reason: str) -> Poison:
    """A parsed item that still cannot be worked on: a dead letter naming why."""
    shown = {"s": item.shard, "n": item.name, "u": item.url}
    return Poison(item.id, status.DEAD_LETTER, reason, shown)
