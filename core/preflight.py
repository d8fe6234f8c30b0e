"""The start-up check of a bucket that a command reads or writes the corpus in.

Every command that works on a corpus in object storage (the crawl worker, `run`, `enqueue`,
`retry`, the assignment worker, `serve-dataset`, `dataset-index`, `export`) calls
`check_bucket` before it does any work: a missing bucket, refused credentials or an
unreachable endpoint end it with one line and exit code 4 (`ExitCode.OUTPUT_UNAVAILABLE`).
A writer's check writes and removes a probe object, a reader's lists one page, so a reader
with read-only credentials passes. (A local output is not checked here: one that cannot be
written pauses the crawl workers until it can, as a full disk clears.)
"""

from __future__ import annotations

from core.config import StorageConfig
from core.errors import CommandError
from core.exitcodes import ExitCode
from core.status import STATUS_DIR
from core.storage import is_remote, open_storage

AWS_SETTINGS = "AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"


def check_bucket(
    location: str,
    settings: StorageConfig,
    *,
    write: bool = True,
    directory: str = STATUS_DIR,
    setting: str = "paths.output",
) -> None:
    """Raise CommandError (exit code 4) when `location`, an ``s3://bucket/prefix``, cannot
    be written (or, `write` false, read) under `directory`; nothing for a local path.
    `setting` names where the location comes from, for the message."""
    if not is_remote(location):
        return
    problem = open_storage(location, settings).problem_sync(directory, write=write)
    if problem:
        what = "the output" if setting == "paths.output" else setting
        raise CommandError(
            ExitCode.OUTPUT_UNAVAILABLE,
            f"cannot {'write' if write else 'read'} {what}: {problem}; check {setting}, the "
            f"bucket and {AWS_SETTINGS}",
        )
