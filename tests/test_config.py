"""Configuration: defaults, file, environment and flags, with clear errors for bad values."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from core import config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_match_the_shipped_config_toml() -> None:
    shipped = tomllib.loads((ROOT / "config.toml").read_text())
    defaults = config.Config()
    for section, table in shipped.items():
        for key, value in table.items():
            assert getattr(getattr(defaults, section), key) == value, f"{section}.{key}"


def test_every_setting_is_documented_in_config_toml() -> None:
    shipped = tomllib.loads((ROOT / "config.toml").read_text())
    for name, cls in config._sections().items():
        for key in cls.__dataclass_fields__:
            assert key in shipped.get(name, {}), f"{name}.{key} missing from config.toml"


def test_environment_overrides_file_and_flags_override_environment(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text('[limits]\nhost_rate = 3.0\n[fetch]\nuser_agent = "file"\n')
    cfg = config.load(
        file,
        environ={"MMC4_LIMITS__HOST_RATE": "7.5", "MMC4_FETCH__USER_AGENT": "env"},
        overrides=["fetch.user_agent=flag"],
    )
    assert cfg.limits.host_rate == 7.5
    assert cfg.fetch.user_agent == "flag"


def test_lists_tables_and_booleans_parse_from_strings() -> None:
    cfg = config.load(
        None,
        environ={
            "MMC4_INGEST__SHARDS": "a.jsonl, b.jsonl",
            "MMC4_FETCH__HEADERS": "Accept=image/*,X-A=1",
            "MMC4_FETCH__RESPECT_OPT_OUT": "false",
        },
    )
    assert cfg.ingest.shards == ["a.jsonl", "b.jsonl"]
    assert cfg.fetch.headers == {"Accept": "image/*", "X-A": "1"}
    assert cfg.fetch.respect_opt_out is False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("limits.host_rate=fast", "expected float"),
        ("limits.nope=1", "unknown key limits.nope"),
        ("nosection.key=1", "unknown section"),
        ("images.max_side=0", r"images.max_side = 0 is out of range: must be at least 1"),
        ("redis.url=http://x", "redis.url must start with"),
        ("fetch.respect_opt_out=maybe", "expected true or false"),
        ("justtext", "expected section.key=value"),
        ("assign.solver=greedy", "assign.solver"),
        ("images.resample=nearest", "images.resample must be one of bilinear, box"),
        ("images.webp_quality=0", r"images.webp_quality = 0 is out of range: must be in 1\.\.100"),
        ("worker.image_process_heap_mb=-1", "image_process_heap_mb = -1 is out of range"),
        ("metrics.port=99999", r"metrics.port = 99999 is out of range: must be in 0\.\.65535"),
        ("worker.processes=0", "worker.processes = 0 is out of range: must be in 1"),
        ("worker.image_processes=-2", "worker.image_processes = -2 is out of range"),
        ("fetch.total_timeout_s=0", "fetch.total_timeout_s = 0.0 is out of range: must be greater"),
        ("paths.output=s3:///prefix", "names no bucket: s3://bucket/prefix"),
        ("storage.max_inflight=0", r"storage.max_inflight = 0 is out of range: must be in 1\.\."),
    ],
)
def test_bad_values_are_reported_clearly(override: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.load(None, environ={}, overrides=[override])


def test_unknown_key_in_file_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text("[worker]\nwindw = 5\n")
    with pytest.raises(config.ConfigError, match=r"c\.toml: unknown key worker\.windw"):
        config.load(file, environ={})


def test_image_processes_follow_the_container_cpu_quota(tmp_path: Path) -> None:
    from crawler.pool import available_cpus

    host = available_cpus(str(tmp_path / "absent"))
    limited = tmp_path / "cpu.max"
    limited.write_text("150000 100000\n")  # --cpus=1.5
    assert available_cpus(str(limited)) == min(host, 2)
    limited.write_text("max 100000\n")
    assert available_cpus(str(limited)) == host
    limited.write_text("50000 100000\n")
    assert available_cpus(str(limited)) == 1
    limited.write_text("garbage\n")
    assert available_cpus(str(limited)) == host


def test_image_processes_are_pinned_only_when_they_cover_the_cpus_they_may_use() -> None:
    from crawler.pool import pinned_cpus

    assert pinned_cpus(2, {0, 1}, quota_cpus=2) == [0, 1]
    assert pinned_cpus(4, {4, 5}, quota_cpus=2) == [4, 5]  # a cpuset: round robin over it
    assert pinned_cpus(1, {0, 1}, quota_cpus=2) == []  # fewer processes than CPUs
    assert pinned_cpus(2, set(range(64)), quota_cpus=2) == []  # --cpus=2 on a 64-CPU host


def test_every_numeric_setting_has_a_valid_range() -> None:
    cfg = config.Config()
    numeric = {
        f"{section.name}.{f.name}"
        for section in dataclasses.fields(cfg)
        for f in dataclasses.fields(getattr(cfg, section.name))
        if type(getattr(getattr(cfg, section.name), f.name)) in (int, float)
    }
    assert numeric - set(config.RANGES) == set()
    assert set(config.RANGES) - numeric == set()  # no range for a setting that is gone
    for name in numeric:  # every shipped default is inside its own range
        assert config.RANGES[name].contains(
            getattr(getattr(cfg, name.split(".")[0]), name.split(".")[1])
        ), name
