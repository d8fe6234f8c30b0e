"""The exit codes of every `mmc4-crawl` command, in one place (documented in the README).

A command that fails prints one line naming what failed and what to check (no traceback
unless `-vv`) and exits with one of these, so a script or an orchestrator can tell the causes
apart.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1  # the command ran, but part of its work failed (counted and reported)
    USAGE = 2  # a bad argument or configuration value (click's own code for usage errors)
    REDIS_UNAVAILABLE = 3  # Redis could not be reached, refused the password, or is not ours
    OUTPUT_UNAVAILABLE = 4  # the output (directory or bucket) cannot be written or read
    NOT_FOUND = 5  # a named input does not exist (a local shard path, a status, a namespace)
    ADDRESS_IN_USE = 6  # a port could not be bound (serve, metrics)
    STOP_OVERRAN = 7  # a graceful stop overran its deadline and the process was ended
    INTERRUPTED = 130  # stopped by SIGINT before finishing; its resume point is consistent
    TERMINATED = 143  # stopped by SIGTERM before finishing; its resume point is consistent
