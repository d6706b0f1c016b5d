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


# ---- least privilege: the worker's own MLflow user, object-only S3 rights -------------------------

def test_the_worker_is_not_the_mlflow_admin(services):
    admin_refs = set(VAR.findall(str(env_of(services["mlflow"])["MLFLOW_AUTH_ADMIN_USERNAME"]) +
                                 str(env_of(services["mlflow"])["MLFLOW_AUTH_ADMIN_PASSWORD"])))
    for worker in ("worker", "worker-gpu"):
        env = env_of(services[worker])
        used = set(VAR.findall(f"{env['MLFLOW_TRACKING_USERNAME']} {env['MLFLOW_TRACKING_PASSWORD']}"))
        assert used == {"MLFLOW_WORKER_USER", "MLFLOW_WORKER_PASSWORD"}, (worker, used)
        assert not used & admin_refs
        assert not any("MLFLOW_ADMIN" in str(v) for v in env.values()), worker
        assert services[worker]["depends_on"]["mlflow-init"]["condition"] == "service_completed_successfully"
    init = services["mlflow-init"]
    assert init["depends_on"]["mlflow"]["condition"] == "service_healthy" and init["restart"] == "no"
    assert set(VAR.findall(str(env_of(init)["MLFLOW_TRACKING_USERNAME"]))) == {"MLFLOW_ADMIN_USER"}
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["MLFLOW_WORKER_USER"] != example["MLFLOW_ADMIN_USER"]


def test_mlflow_init_makes_a_plain_user_with_edit_rights_only():
    import ast

    source = (REPO / "docker" / "mlflow-init.py").read_text()
    tree = ast.parse(source)
    calls = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            calls.setdefault(name, []).append(node)
    assert "create_user" in calls
    (admin,) = calls["update_user_admin"]
    assert isinstance(admin.args[1], ast.Constant) and admin.args[1].value is False  # never an admin
    constants = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert "EDIT" in constants and not {"MANAGE", "ADMIN"} & constants
    resource_types = {c.args[0].value for c in calls["grant"]}
    assert resource_types == {"experiment", "registered_model"}
    entrypoint = (REPO / "docker" / "mlflow-entrypoint.sh").read_text()
    assert "default_permission = NO_PERMISSIONS" in entrypoint  # no right without a grant


def _minio_policy() -> dict:
    import json

    script = (REPO / "docker" / "minio-init.sh").read_text()
    body = script.split("<<JSON\n", 1)[1].split("\nJSON\n", 1)[0]
    return json.loads(body)


def test_the_s3_user_may_only_work_with_objects_in_its_two_buckets():
    policy = _minio_policy()
    buckets = {"arn:aws:s3:::mlflow", "arn:aws:s3:::tilewise"}
    objects = {f"{b}/*" for b in buckets}
    # what reading and writing objects needs (listing, multipart uploads included); nothing else
    bucket_actions = {"s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"}
    object_actions = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
                      "s3:ListMultipartUploadParts"}
    seen = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and "NotAction" not in statement and "NotResource" not in statement
        actions = set(statement["Action"]) if isinstance(statement["Action"], list) else {statement["Action"]}
        resources = set(statement["Resource"]) if isinstance(statement["Resource"], list) else {statement["Resource"]}
        assert not any("*" in a for a in actions), actions  # no s3:*, no s3:Put*
        if resources <= buckets:
            assert actions <= bucket_actions, actions
        else:
            assert resources <= objects and actions <= object_actions, (resources, actions)
        seen |= actions
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= seen
    assert "s3:PutBucketPolicy" not in seen
