"""The docker-compose stack's structure (there is no Docker engine here to start it).

Parsed with PyYAML; the rules are the README's: every service present, a healthcheck on every
long-running service, published ports bound to 127.0.0.1, no credential literal (every password,
secret, key or auth value is a ``${VAR}`` reference), ordering by health, a GPU worker profile,
``.env.example`` defining every variable the file uses, the worker image running ``tilewise serve``.
Also: prefect.yaml's nightly deployments agree with the bundled catalog's schedules.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LONG_RUNNING = {"postgres", "minio", "prefect-server", "mlflow", "worker", "worker-gpu"}
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?+][^}]*)?\}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEY|KEY_ID|AUTH_STRING|USERNAME|_USER$|CONNECTION_URL|_URI$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env_of(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return env


def test_the_stack_has_every_service(services):
    assert LONG_RUNNING | {"minio-init"} <= set(services)


def test_every_long_running_service_has_a_healthcheck(services):
    for name in LONG_RUNNING:
        check = services[name].get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name


def test_published_ports_are_bound_to_localhost(services):
    published = 0
    for name, service in services.items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                assert str(port).startswith("127.0.0.1:"), (name, port)
    assert published >= 3  # Prefect, MLflow, MinIO


def test_credentials_are_references_to_the_env_file(services):
    checked = 0
    for name, service in services.items():
        for key, value in env_of(service).items():
            if not SECRET_NAME.search(key):
                continue
            text = VAR.sub("$REF", str(value))
            # a URL may carry user:password@host: both parts must be references
            for cred in re.findall(r"//([^@/]*)@", text):
                assert cred == "$REF:$REF", (name, key, value)
            if "//" not in text:
                assert text == "$REF", (name, key, value)
            checked += 1
    assert checked >= 10


def strings(node):
    """Every string value (and key) in a parsed YAML document: comments are not part of it."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif node is not None:
        yield str(node)


def test_no_literal_secret_anywhere_in_the_compose_file(compose):
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    values = list(strings(compose))
    placeholders = [v for k, v in example.items() if SECRET_NAME.search(k) and "change-me" in v]
    assert placeholders
    for text in values:
        for placeholder in placeholders:
            assert placeholder not in text, text
        for literal in ("tilewise-secret", "minioadmin", "password1234"):
            assert literal not in text, text


def test_env_example_defines_every_variable_and_uses_placeholders(compose):
    text = (REPO / "docker-compose.yml").read_text()
    used = set(VAR.findall(text))
    example = {line.split("=", 1)[0]: line.split("=", 1)[1]
               for line in (REPO / ".env.example").read_text().splitlines() if line and not line.startswith("#")}
    optional = {m.group(1) for m in re.finditer(r"\$\{([A-Za-z_0-9]+):?-[^}]*\}", text)}
    assert used - optional <= set(example), sorted(used - optional - set(example))
    for key, value in example.items():
        if re.search(r"PASSWORD|SECRET|AUTH_STRING", key):
            assert "change-me" in value, key
    required = {m.group(1) for m in re.finditer(r"\$\{([A-Za-z_0-9]+):\?[^}]*\}", text)}
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "S3_SECRET_KEY", "PREFECT_AUTH_STRING",
            "MLFLOW_ADMIN_PASSWORD"} <= required


def test_services_wait_for_what_they_need_to_be_healthy(services):
    def deps(name):
        return services[name]["depends_on"]

    assert deps("prefect-server")["postgres"]["condition"] == "service_healthy"
    assert deps("mlflow")["postgres"]["condition"] == "service_healthy"
    assert deps("mlflow")["minio-init"]["condition"] == "service_completed_successfully"
    assert deps("minio-init")["minio"]["condition"] == "service_healthy"
    for worker in ("worker", "worker-gpu"):
        assert deps(worker)["prefect-server"]["condition"] == "service_healthy"
        assert deps(worker)["mlflow"]["condition"] == "service_healthy"


def test_gpu_profile_reserves_a_gpu_and_the_cpu_worker_does_not(services):
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert services["worker"]["profiles"] == ["cpu"] and "deploy" not in services["worker"]
    assert env_of(gpu)["PREFECT_API_URL"] == env_of(services["worker"])["PREFECT_API_URL"]


def test_servers_require_auth(services):
    assert VAR.fullmatch(env_of(services["prefect-server"])["PREFECT_SERVER_API_AUTH_STRING"])
    entrypoint = (REPO / "docker" / "mlflow-entrypoint.sh").read_text()
    assert "--app-name basic-auth" in entrypoint
    assert "/health" in str(services["mlflow"]["healthcheck"]["test"])  # outside basic auth
    for worker in ("worker", "worker-gpu"):
        env = env_of(services[worker])
        assert {"PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(env)


def test_mlflow_uses_postgres_and_minio_artifacts(services):
    mlflow = services["mlflow"]
    env = env_of(mlflow)
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "--artifacts-destination=s3://mlflow/artifacts" in mlflow["command"]
    assert "mlflow" in (REPO / "docker" / "minio-init.sh").read_text().split("mc mb")[1].splitlines()[0]
    sql = (REPO / "docker" / "postgres-init.sql").read_text()
    assert "CREATE DATABASE mlflow;" in sql and env["MLFLOW_BACKEND_STORE_URI"].endswith("/mlflow")


def test_worker_image_runs_tilewise_serve():
    lines = (REPO / "docker" / "tilewise.Dockerfile").read_text().splitlines()
    cmd = [line for line in lines if line.startswith("CMD")]
    assert len(cmd) == 1
    argv = yaml.safe_load(cmd[0][3:].strip())  # exec form: a JSON list
    assert argv[:2] == ["tilewise", "serve"], argv
    assert not any(line.startswith("ENTRYPOINT") for line in lines)
    assert shlex.join(argv).endswith("--catalog /catalog")


def test_prefect_yaml_matches_the_bundled_catalog():
    from data_catalog import DEFAULT_CATALOG_DIR, load_catalog

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    entries = {e.entry.name: e.entry for e in load_catalog(DEFAULT_CATALOG_DIR)}
    assert set(deployments) == set(entries) | {"backfill"}
    for name, entry in entries.items():
        d = deployments[name]
        assert d["entrypoint"] == "flows/nightly.py:nightly_flow"
        assert d["parameters"]["datasets"] == [name]
        assert [(s["cron"], s["timezone"]) for s in d["schedules"]] == [(entry.schedule.cron, entry.schedule.timezone)]
        assert d["work_pool"]["name"] == "tilewise"
    assert deployments["backfill"]["entrypoint"] == "flows/backfill.py:backfill_flow"
    assert not deployments["backfill"]["schedules"]
