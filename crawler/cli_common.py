"""What the `mmc4-crawl` commands share: the configuration they load (group options) and the
crawl's Redis they find."""

from __future__ import annotations

from pathlib import Path

import click

from core import config as config_mod
from core.config import Config
from core.errors import CommandError
from core.exitcodes import ExitCode


class State:
    def __init__(self, config_path: str | None, overrides: list[str]) -> None:
        self.config_path = config_path
        self.overrides = overrides

    def load(self) -> Config:
        cfg = config_mod.load(self.config_path, overrides=self.overrides)
        ctx = click.get_current_context(silent=True)
        if ctx is not None:  # for the one-line error of a failing command
            ctx.meta["mmc4.redis_url"] = cfg.redis.url
        return cfg

    def argv(self) -> list[str]:
        """The group options, to start worker processes with the same configuration."""
        out: list[str] = []
        if self.config_path:
            out += ["--config", self.config_path]
        for item in self.overrides:
            out += ["--set", item]
        return out


pass_state = click.make_pass_decorator(State)


def find_redis(cfg: Config) -> None:
    """Find the crawl's Redis: redis.url, else the private Redis of a `run` that is running
    with the same paths.data_dir."""
    if cfg.redis.url:
        return
    from core.embedded import running_url

    url = running_url(Path(cfg.paths.data_dir))
    if url is None:
        raise CommandError(
            ExitCode.USAGE,
            "redis.url is not set (use --redis-url, MMC4_REDIS__URL or config.toml) and no "
            f"`run` is running with data directory {cfg.paths.data_dir} (paths.data_dir)",
        )
    cfg.redis.url = url
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta["mmc4.redis_url"] = url
