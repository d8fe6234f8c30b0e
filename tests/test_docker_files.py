"""Specifications of the container files: docker/Dockerfile, docker/compose.yaml,
docker/prometheus.yml and .dockerignore.

No Docker engine is needed: the files are read and checked against the code they drive. Every
command a container runs must be a real subcommand of the right click group with real options,
every ``MMC4_<SECTION>__<KEY>`` variable a real setting with a value that parses, and the
operational promises (durable Redis, health checks, graceful drain, scraping) must hold.
Compose variables (``${VAR:-default}``) are resolved with their defaults, as with an empty
shell environment and no ``.env`` file.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import importlib
import json
import re
import shlex
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from core.config import Config, ConfigError, apply_env

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
PROMETHEUS = DOCKER / "prometheus.yml"
DOCKERIGNORE = ROOT / ".dockerignore"

OUR_DOCKERFILE = "docker/Dockerfile"
VALID_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
# MMC4_ variables that are not settings: the config file path (core.config.default_config_path).
NON_SETTING_VARIABLES = {"MMC4_CONFIG"}
SERVICE_ROLES = {"redis", "ingest", "worker", "assign", "status", "prometheus"}


# --- reading the files -----------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_]\w*)")


def interpolate(value: str) -> str:
    """Compose variable substitution with an empty environment: defaults apply. A variable
    without a default would be empty (or an error): the compose file must work without a
    .env file, so that is a failure here."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3)
        assert op in (":-", "-"), f"${{{name}}} in {value!r} needs a default (${{{name}:-...}})"
        return default

    return _VAR.sub(sub, value)


def resolve(node: Any) -> Any:
    if isinstance(node, str):
        return interpolate(node)
    if isinstance(node, list):
        return [resolve(v) for v in node]
    if isinstance(node, dict):
        return {k: resolve(v) for k, v in node.items()}
    return node


@functools.cache
def compose_raw() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@functools.cache
def compose() -> dict[str, Any]:
    return resolve(compose_raw())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def ours(name: str) -> bool:
    """Built from docker/Dockerfile (every role of the project shares that one image)."""
    build = services()[name].get("build")
    return isinstance(build, dict) and build.get("dockerfile") == OUR_DOCKERFILE


def our_services() -> list[str]:
    return [name for name in services() if ours(name)]


def argv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), value
    return list(value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    for name, value in env.items():
        assert value is not None, f"{name} has no value (it would depend on the shell)"
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in env.items()}


@dataclass
class Dockerfile:
    """The instructions of each stage, continuation lines joined."""

    stages: list[list[tuple[str, str]]] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)

    @property
    def final(self) -> list[tuple[str, str]]:
        return self.stages[-1]

    def all(self, instruction: str, stage: list[tuple[str, str]] | None = None) -> list[str]:
        return [rest for ins, rest in (stage or self.final) if ins == instruction]

    def last(self, instruction: str) -> str:
        found = self.all(instruction)
        assert found, f"the final stage has no {instruction}"
        return found[-1]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for rest in self.all("ENV"):
            for token in shlex.split(rest):
                name, sep, value = token.partition("=")
                assert sep, f"ENV {rest!r}: use the NAME=value form"
                out[name] = value
        return out


@functools.cache
def dockerfile() -> Dockerfile:
    text = DOCKERFILE.read_text(encoding="utf-8")
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    df = Dockerfile()
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ARG" and not df.stages:
            name, _, default = rest.partition("=")
            df.args[name.strip()] = default.strip()
            continue
        if instruction == "FROM":
            df.stages.append([])
        assert df.stages, f"{line!r} before the first FROM"
        df.stages[-1].append((instruction, rest.strip()))
    return df


def exec_form(rest: str) -> list[str]:
    """JSON (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD: no shell, signals reach the process."""
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return value


def base_image(from_rest: str, args: dict[str, str]) -> str:
    image = from_rest.split()[0]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], image)


@functools.cache
def console_scripts() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return dict(project["scripts"])


def click_group(script: str) -> click.Group:
    assert script in console_scripts(), f"{script!r} is not in [project.scripts]"
    module, _, attr = console_scripts()[script].partition(":")
    group = getattr(importlib.import_module(module), attr)
    # an entry point may be a thin wrapper that names the module of its click group
    wrapped = getattr(group, "cli_module", None)
    if wrapped is not None:
        group = importlib.import_module(wrapped).main
    assert isinstance(group, click.Group), f"{script} is not a click group"
    return group


def image_entrypoint() -> list[str]:
    return exec_form(dockerfile().last("ENTRYPOINT"))


def image_healthcheck() -> list[str] | None:
    rest = dockerfile().last("HEALTHCHECK")
    if rest.upper() == "NONE":
        return None
    m = re.search(r"\bCMD\s+(\[.*\])\s*$", rest)
    assert m, f"HEALTHCHECK {rest!r}: use the exec form CMD [...]"
    return exec_form(m.group(1))


def check_invocation(words: list[str], where: str) -> click.Command:
    """words = [console script, subcommand, options...]: the subcommand exists in that
    script's click group, every option exists on it, and click accepts the whole line."""
    assert words, f"{where}: empty command"
    script, *rest = words
    group = click_group(script)
    assert rest, f"{where}: {script} needs a subcommand"
    name, *args = rest
    assert name in group.commands, f"{where}: {script} has no subcommand {name!r}"
    command = group.commands[name]
    known = {"--help"} | set(command.get_help_option_names(click.Context(command)))
    for param in command.params:
        known.update(param.opts)
        known.update(param.secondary_opts)
    for arg in args:
        if arg == "--":
            break
        if arg.startswith("-"):
            option = arg.split("=", 1)[0]
            assert option in known, f"{where}: `{script} {name}` has no option {option}"
    try:
        command.make_context(name, list(args))
    except click.ClickException as exc:
        pytest.fail(f"{where}: `{' '.join(words)}` is refused by click: {exc.format_message()}")
    return command


def service_invocation(name: str) -> list[str]:
    """The full argv a container of this service runs (entrypoint + command)."""
    svc = services()[name]
    entrypoint = argv(svc["entrypoint"]) if "entrypoint" in svc else image_entrypoint()
    command = argv(svc["command"]) if "command" in svc else exec_form(dockerfile().last("CMD"))
    return entrypoint + command


def healthcheck_argv(name: str) -> list[str] | None:
    """The health check a container of this service runs; None if there is none."""
    svc = services()[name]
    check = svc.get("healthcheck")
    if check is None:
        return image_healthcheck() if ours(name) else None
    if check.get("disable"):
        return None
    test = argv(check["test"])
    assert test and test[0] in ("CMD", "CMD-SHELL", "NONE"), f"{name}: healthcheck {test}"
    if test[0] == "NONE":
        return None
    if test[0] == "CMD-SHELL":
        return shlex.split(" ".join(test[1:]))
    return test[1:]


def is_crawl_worker(name: str) -> bool:
    return service_invocation(name)[:2] == ["mmc4-crawl", "worker"]


def seconds(duration: str | int | float) -> float:
    if isinstance(duration, int | float):
        return float(duration)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+(?:\.\d+)?)s)?", duration)
    assert parts and duration, f"not a compose duration: {duration!r}"
    h, m, s = parts.groups()
    return int(h or 0) * 3600 + int(m or 0) * 60 + float(s or 0)


@dataclass
class Mount:
    source: str
    target: str
    read_only: bool

    @property
    def named(self) -> bool:
        return not self.source.startswith((".", "/", "~"))


def mounts(name: str) -> list[Mount]:
    out = []
    for volume in services()[name].get("volumes", []):
        assert isinstance(volume, str), f"{name}: use the short volume syntax"
        source, target, *mode = volume.split(":")
        out.append(Mount(source, target, "ro" in (mode[0].split(",") if mode else [])))
    return out


def effective_config(name: str) -> Config:
    """Defaults + the image's ENV + the service's environment (config.toml mirrors the
    defaults)."""
    cfg = Config()
    env = {**dockerfile().env(), **environment(services()[name])}
    apply_env(cfg, {k: v for k, v in env.items() if "__" in k})
    cfg.validate()
    return cfg


# --- compose: commands -----------------------------------------------------------------------


def test_compose_has_every_role_and_the_shared_image() -> None:
    assert set(services()) >= SERVICE_ROLES
    assert set(our_services()) == {"ingest", "worker", "assign", "status"}
    images = {services()[name].get("image") for name in our_services()}
    assert len(images) == 1, f"the roles must share one image tag: {images}"


@pytest.mark.parametrize("name", ["ingest", "worker", "assign", "status"])
def test_each_service_runs_a_real_subcommand_with_real_options(name: str) -> None:
    check_invocation(service_invocation(name), f"service {name}")


def test_roles_run_the_intended_commands() -> None:
    assert service_invocation("ingest")[:2] == ["mmc4-crawl", "enqueue"]
    assert service_invocation("worker")[:2] == ["mmc4-crawl", "worker"]
    # the image's entrypoint is mmc4-crawl: the assignment worker overrides it
    assert service_invocation("assign")[:2] == ["mmc4-assign", "worker"]
    status = service_invocation("status")
    assert status[:2] == ["mmc4-crawl", "serve"]
    ctx = click_group("mmc4-crawl").commands["serve"].make_context("serve", status[2:])
    assert ctx.params["host"] == "0.0.0.0", "serve must listen beyond the container's loopback"
    published = [str(p).rsplit(":", 1)[-1] for p in services()["status"].get("ports", [])]
    assert str(ctx.params["port"]) in published


# --- compose: environment --------------------------------------------------------------------


def _settings() -> dict[str, set[str]]:
    hints = typing.get_type_hints(Config)
    return {
        f.name: {g.name for g in dataclasses.fields(hints[f.name])}
        for f in dataclasses.fields(Config)
    }


@pytest.mark.parametrize("name", ["ingest", "worker", "assign", "status"])
def test_every_mmc4_variable_names_a_real_setting_and_parses(name: str) -> None:
    env = environment(services()[name])
    settings = _settings()
    for variable, value in env.items():
        assert variable.startswith("MMC4_"), f"{name}: {variable} is not ours"
        if variable in NON_SETTING_VARIABLES:
            continue
        section, sep, key = variable[len("MMC4_") :].partition("__")
        assert sep, f"{name}: {variable} is not MMC4_<SECTION>__<KEY>"
        assert section.lower() in settings, f"{name}: {variable}: no section [{section.lower()}]"
        assert key.lower() in settings[section.lower()], (
            f"{name}: {variable}: no setting {section.lower()}.{key.lower()}"
        )
        try:
            apply_env(Config(), {variable: value})
        except ConfigError as exc:
            pytest.fail(f"{name}: {exc}")
    effective_config(name)  # all together still validate


def test_the_image_env_names_real_settings_too() -> None:
    env = dockerfile().env()
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("PIP_NO_CACHE_DIR") == "1"
    cfg = Config()
    apply_env(cfg, {k: v for k, v in env.items() if k.startswith("MMC4_")})
    cfg.validate()
    assert cfg.paths.output.startswith("/data/")


def test_every_service_of_ours_shares_redis_and_output() -> None:
    for name in our_services():
        cfg = effective_config(name)
        assert cfg.redis.url.startswith("redis://redis:"), f"{name}: redis.url {cfg.redis.url!r}"
        assert cfg.redis.namespace == effective_config("worker").redis.namespace
        assert cfg.paths.output == "/data/images", name


def test_the_mounted_config_file_is_where_mmc4_config_points() -> None:
    for name in our_services():
        env = environment(services()[name])
        if "MMC4_CONFIG" in env:
            targets = {m.target: m for m in mounts(name)}
            assert env["MMC4_CONFIG"] in targets, f"{name}: MMC4_CONFIG is not mounted"
            mount = targets[env["MMC4_CONFIG"]]
            assert mount.read_only
            assert (DOCKER / mount.source).resolve().is_file(), f"{name}: {mount.source} missing"


# --- compose: redis, health, drain, dependencies ---------------------------------------------


def test_redis_is_durable_and_health_checked() -> None:
    redis = services()["redis"]
    command = argv(redis["command"])
    assert command[0] == "redis-server"
    if not command[1].startswith("--"):
        command = command[1:]  # a configuration file first
    options = dict(zip(command[1::2], command[2::2], strict=False))
    assert options.get("--appendonly") == "yes"
    assert options.get("--appendfsync") in ("always", "everysec")
    # the queue must never be evicted
    assert options.get("--maxmemory-policy", "noeviction") == "noeviction"
    check = healthcheck_argv("redis")
    assert check is not None and check[1:] == ["redis-cli", "ping", "|", "grep", "-q", "PONG"]
    data = [m for m in mounts("redis") if m.target == "/data"]
    assert data and data[0].named, "Redis keeps its AOF in a named volume"
    assert str(redis["image"]).startswith("redis:7")


def test_redis_requires_the_generated_password_and_is_published_nowhere() -> None:
    redis, secret = services()["redis"], services()["redis-secret"]
    assert "ports" not in redis
    assert redis["depends_on"]["redis-secret"]["condition"] == "service_completed_successfully"
    assert argv(redis["command"])[1] == "/run/mmc4/redis-auth.conf"
    script = " ".join(argv(secret["command"]))
    assert "/dev/urandom" in script and "requirepass" in script and "redis-auth.conf" in script
    assert "REDISCLI_AUTH" in " ".join(argv(redis["healthcheck"]["test"]))
    for name in our_services():
        cfg = effective_config(name)
        assert cfg.redis.password_file == "/run/mmc4/redis-password", name
        secret_mounts = [m for m in mounts(name) if m.target == "/run/mmc4"]
        assert secret_mounts and secret_mounts[0].read_only, name
        assert services()[name]["depends_on"]["redis-secret"]["condition"] == (
            "service_completed_successfully"
        )


def test_published_ports_are_on_loopback_unless_asked_otherwise() -> None:
    for name, svc in services().items():
        for port in svc.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port}"
    raw = COMPOSE.read_text(encoding="utf-8")
    assert raw.count("${MMC4_PUBLISH_HOST:-127.0.0.1}:") == len(
        [p for svc in services().values() for p in svc.get("ports", [])]
    )


def test_every_base_image_is_pinned_to_a_version() -> None:
    df = dockerfile()
    images = [base_image(stage[0][1], df.args) for stage in df.stages]
    images += [str(svc["image"]) for n, svc in services().items() if not ours(n)]
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and re.match(r"v?\d+\.\d+\.\d+", tag), f"{image} is not pinned to a version"


def test_the_crawl_worker_health_check_is_a_heartbeat_check() -> None:
    check = healthcheck_argv("worker")
    assert check is not None, "the worker needs a health check"
    assert check[:3] == ["mmc4-crawl", "worker", "--check"]
    check_invocation(check, "worker healthcheck")


def test_the_image_health_check_is_only_inherited_by_crawl_workers() -> None:
    # the image's check looks for this container's worker heartbeat: other roles have none,
    # so compose must override (or disable) it for them
    image_check = image_healthcheck()
    assert image_check is not None and image_check[:3] == ["mmc4-crawl", "worker", "--check"]
    check_invocation(image_check, "Dockerfile HEALTHCHECK")
    for name in our_services():
        if not is_crawl_worker(name):
            assert "healthcheck" in services()[name], f"{name} would inherit the worker check"
            check = healthcheck_argv(name)
            assert check is None or check[:2] != ["mmc4-crawl", "worker"], name


def test_the_status_health_check_asks_its_own_port() -> None:
    check = healthcheck_argv("status")
    assert check is not None
    assert "/healthz" in " ".join(check) and ":8080" in " ".join(check)


def test_workers_drain_on_sigterm_within_the_stop_grace_period() -> None:
    worker = services()["worker"]
    assert worker.get("stop_signal", dockerfile().last("STOPSIGNAL")) == "SIGTERM"
    grace = effective_config("worker").worker.grace_period_s
    stop = seconds(worker.get("stop_grace_period", "10s"))
    assert stop > grace, f"docker kills at {stop}s, before worker.grace_period_s={grace}"
    assert stop <= grace + 60, "a much longer stop period only delays restarts"
    assert worker.get("restart") == "unless-stopped"


def test_ingest_is_one_shot_and_gets_its_shards() -> None:
    ingest = services()["ingest"]
    assert ingest.get("restart") == "no"
    shards = effective_config("ingest").ingest.shards
    assert shards, "ingest needs shards (MMC4_INGEST__SHARDS or config.toml)"
    shard_mount = next(m for m in mounts("ingest") if m.target == "/data/shards")
    assert shard_mount.read_only
    assert all(s.startswith(("/data/shards", "http://", "https://")) for s in shards)


def test_depends_on_conditions_are_valid() -> None:
    svcs = services()
    for name, svc in svcs.items():
        depends = svc.get("depends_on", {})
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        for target, spec in depends.items():
            assert target in svcs, f"{name} depends on unknown service {target}"
            condition = spec.get("condition", "service_started")
            assert condition in VALID_CONDITIONS, f"{name} -> {target}: {condition}"
            if condition == "service_healthy":
                assert healthcheck_argv(target) is not None, f"{target} has no health check"
            if condition == "service_completed_successfully":
                assert svcs[target].get("restart") == "no", f"{target} is not one-shot"
            if not svc.get("profiles"):
                assert not svcs[target].get("profiles"), f"{name} needs profiled {target}"
    for name in our_services():
        condition = svcs[name]["depends_on"]["redis"]["condition"]
        assert condition == "service_healthy", name


# --- compose: volumes ------------------------------------------------------------------------


def test_volumes_are_declared_and_shards_are_read_only() -> None:
    declared = set(compose().get("volumes") or {})
    for name in services():
        for mount in mounts(name):
            if mount.named:
                assert mount.source in declared, f"{name}: volume {mount.source} undeclared"
            if mount.target == "/data/shards":
                assert mount.read_only, f"{name}: shards must be mounted read-only"


def test_writers_mount_the_images_volume_read_write() -> None:
    # (with the output on local disk, the default; a bucket needs no volume)
    # workers write images and reports, the assignment worker OUTPUT/_shards
    for name in ("worker", "assign"):
        output = effective_config(name).paths.output
        mount = next((m for m in mounts(name) if m.target == output), None)
        assert mount is not None and not mount.read_only, f"{name}: {output} not writable"
    sources = {
        next(m.source for m in mounts(n) if m.target == "/data/images")
        for n in ("worker", "assign", "ingest")
    }
    assert len(sources) == 1, f"one images volume for every role: {sources}"
    # the assignment worker reads source shards where ingest saw them
    assert any(m.target == "/data/shards" for m in mounts("assign"))


# --- compose: output to a bucket ------------------------------------------------------------

S3_ENV_EXAMPLE = DOCKER / "s3.env.example"


def s3_variables(text: str) -> dict[str, str]:
    """``NAME=value`` lines of an env file, commented-out ones included (they are options)."""
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def obstore_reads(variable: str, value: str) -> bool:
    """Whether obstore's S3 store knows the setting an AWS_* variable names (an unknown one
    is refused by name; a known one may still want others beside it)."""
    from obstore.exceptions import UnknownConfigurationKeyError
    from obstore.store import S3Store

    try:
        S3Store("bucket", config={variable.lower(): value or "x"})
    except UnknownConfigurationKeyError:
        return False
    except Exception:
        return True
    return True


def test_the_output_can_be_a_bucket_named_by_mmc4_output() -> None:
    raw = compose_raw()["x-env"]["MMC4_PATHS__OUTPUT"]
    assert raw == "${MMC4_OUTPUT:-/data/images}"
    cfg = Config()
    apply_env(cfg, {"MMC4_PATHS__OUTPUT": "s3://bucket/mmc4"})
    cfg.validate()


def test_every_role_of_ours_reads_the_buckets_credentials_from_an_optional_file() -> None:
    for name in services():
        files = services()[name].get("env_file", [])
        if not ours(name):
            assert not files, f"{name} gets the bucket's credentials"
            continue
        assert files == [{"path": "s3.env", "required": False}], name
    # the file itself stays out of git and of the image's build context
    assert "/docker/s3.env" in (ROOT / ".gitignore").read_text().splitlines()
    assert "docker/s3.env" in DOCKERIGNORE.read_text().splitlines()


def test_the_s3_env_example_names_only_variables_obstore_reads() -> None:
    variables = s3_variables(S3_ENV_EXAMPLE.read_text(encoding="utf-8"))
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL"} <= set(
        variables
    )
    for variable, value in variables.items():
        assert variable.startswith("AWS_"), variable
        assert obstore_reads(variable, value), f"{variable}: obstore has no such setting"
    assert not obstore_reads("AWS_ENDPOINT_URLL", "x")  # the check can fail


def test_raw_compose_uses_x_anchors_for_shared_settings() -> None:
    raw = COMPOSE.read_text(encoding="utf-8")
    assert any(k.startswith("x-") for k in compose_raw())
    assert "<<: *env" in raw
    raw_env = [services()[n]["environment"] for n in our_services()]
    assert all(e["MMC4_REDIS__URL"] == raw_env[0]["MMC4_REDIS__URL"] for e in raw_env)


# --- Dockerfile and .dockerignore ------------------------------------------------------------


def test_dockerfile_final_stage_is_slim_python_311() -> None:
    df = dockerfile()
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base_image(df.final[0][1], df.args))
    final_runs = " ".join(df.all("RUN"))
    assert "build-essential" not in final_runs, "compilers belong to the builder stage"
    if len(df.stages) > 1:
        builder = " ".join(df.all("RUN", df.stages[0]))
        assert "pip wheel" in builder


def test_dockerfile_installs_libmagic_lean() -> None:
    runs = [r for r in dockerfile().all("RUN") if "libmagic1" in r]
    assert runs, "python-magic needs libmagic1"
    assert "--no-install-recommends" in runs[0]
    assert "rm -rf /var/lib/apt/lists" in runs[0]


def test_dockerfile_runs_as_a_non_root_user() -> None:
    user = dockerfile().last("USER").split(":")[0]
    assert user not in ("root", "0", ""), f"USER {user}"


def test_dockerfile_entrypoint_is_a_console_script_and_cmd_a_subcommand() -> None:
    entrypoint = image_entrypoint()
    assert entrypoint == ["mmc4-crawl"]
    assert entrypoint[0] in console_scripts()
    command = exec_form(dockerfile().last("CMD"))
    assert command == ["worker"]
    check_invocation(entrypoint + command, "Dockerfile ENTRYPOINT + CMD")


def test_dockerfile_declares_the_data_volume_and_workdir() -> None:
    df = dockerfile()
    volumes = " ".join(df.all("VOLUME"))
    assert "/data" in volumes
    assert df.last("WORKDIR").startswith("/")


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps PATH out of the build context (close to Docker's rules:
    the last matching pattern wins, "!" re-includes, "**/" matches any depth, a directory's
    exclusion covers what is inside it)."""
    verdict = False
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for line in patterns:
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        candidates = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            verdict = not negate
    return verdict


def test_dockerfile_copies_what_the_build_needs_and_dockerignore_lets_it_through() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    copied: set[str] = set()
    for stage in dockerfile().stages:
        for rest in dockerfile().all("COPY", stage):
            words = [w for w in rest.split() if not w.startswith("--")]
            if "--from" in rest:
                continue
            for source in words[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
                assert not _ignored(source, patterns), f".dockerignore excludes {source}"
                copied.add(source.strip("/"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {p.rstrip("*") for p in packages}
    assert needed <= copied, f"not copied into the build: {needed - copied}"
    heavy = (".venv", ".git", "mmc4_output", "mmc4_data", "crawler/__pycache__", ".pytest_cache")
    for path in heavy:
        assert _ignored(path, patterns), f".dockerignore lets {path} through"


# --- Prometheus ------------------------------------------------------------------------------


def test_prometheus_is_optional_and_mounts_its_config() -> None:
    prom = services()["prometheus"]
    assert "monitoring" in prom.get("profiles", [])
    mount = next(m for m in mounts("prometheus") if m.target.endswith("prometheus.yml"))
    assert (DOCKER / mount.source).resolve() == PROMETHEUS
    assert mount.read_only


def test_prometheus_scrapes_every_worker_on_the_metrics_port() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    port = effective_config("worker").metrics.port
    assert port == 9400
    assert effective_config("worker").metrics.host == "0.0.0.0"
    assert str(port) in [str(p) for p in services()["worker"].get("expose", [])]
    worker_sd = [
        sd
        for job in config["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        if {"worker", "tasks.worker"} & set(sd["names"])
    ]
    assert worker_sd, "no DNS service discovery of the worker replicas"
    assert all(sd["port"] == port and sd.get("type", "SRV") == "A" for sd in worker_sd)


def test_prometheus_static_targets_are_services_on_their_ports() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.partition(":")
                assert host in services(), f"{job['job_name']}: no service {host}"
                if host == "status":
                    ctx = (
                        click_group("mmc4-crawl")
                        .commands["serve"]
                        .make_context("serve", service_invocation("status")[2:])
                    )
                    assert int(port) == ctx.params["port"]


def test_the_assign_worker_health_check_is_its_own_heartbeat_check() -> None:
    check = healthcheck_argv("assign")
    assert check is not None and check[:3] == ["mmc4-assign", "worker", "--check"]
    check_invocation(check, "assign healthcheck")
