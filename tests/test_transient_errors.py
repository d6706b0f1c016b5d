"""Transient storage and registry errors are retried, boundedly; permanent ones are said at once.

S3: the moto server behind a fault-injecting proxy (tests/faults.py). A few 503 / SlowDown answers
or reset connections, then a normal answer: the scan is ingested (botocore's retries). The storage
answering 503 every time: after exactly the configured attempts, a ConnectionError naming the URL
(the flows retry the task; the CLI says one line) -- not a ScanError. 403 / 404: one request, a
ScanError at once.

Registry: a model version whose logged model's artifacts are served over HTTP (MLflow's
mlflow-artifacts API, by a fake artifact server behind the same fault injection). A few 503s then
the files: the model loads (MLflow's HTTP retries). 503 every time: RegistryUnavailable (a
ConnectionError) after 1 + MLFLOW_HTTP_REQUEST_MAX_RETRIES requests. 403: a RegistryError at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from typer.testing import CliRunner

from tasks.errors import ScanError
from tasks.ingest import ScanSpec, ingest_scan
from tasks.ingest.remote import RemoteUnavailable, describe_sources
from tests.faults import FaultServer

SAMPLES = Path(__file__).parents[1] / "data_catalog/samples"
CHIP = SAMPLES / "satellite/spacenet1_rio/images/3band_013022223130_Public_img53.tif"


@pytest.fixture
def faulty_s3(s3, monkeypatch):
    """The ``s3`` bucket, reached through a fault-injecting proxy, botocore retrying 3 times."""
    import s3fs

    proxy = FaultServer(upstream=s3.endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # the bound under test (a short one: backoff is real)
    monkeypatch.setenv("TILEWISE_HOME", str(Path(os.environ["TILEWISE_HOME"]) / f"faults-{s3.bucket}"))
    s3fs.S3FileSystem.clear_instance_cache()
    s3.put("rio/chip.tif", CHIP)
    yield s3, proxy
    proxy.close()
    s3fs.S3FileSystem.clear_instance_cache()


def _spec(url: str) -> ScanSpec:
    remote = describe_sources([url])
    return ScanSpec("chip", "satellite", remote.source_urls(), remote=remote)


def _gets(proxy) -> list:
    return [r for r in proxy.requests if r[0] == "GET" and "list-type" not in r[1]]


@pytest.mark.parametrize("faults", [(503, 503), ("slowdown", "slowdown"), ("reset", "reset")])
def test_a_transient_fault_is_retried_and_the_scan_ingested(faulty_s3, tmp_path, faults):
    s3, proxy = faulty_s3
    spec = _spec(f"{s3.url}/rio/chip.tif")
    proxy.requests.clear()
    proxy.fail_next(*faults)  # the object's GET fails twice, the third try gets it
    result = ingest_scan(spec, tmp_path / "chip.zarr")
    assert result.status == "ingested"
    gets = _gets(proxy)
    assert [g[2] for g in gets] == [*faults, None]


def test_a_storage_that_keeps_failing_is_retried_a_bounded_number_of_times(faulty_s3, tmp_path):
    s3, proxy = faulty_s3
    url = f"{s3.url}/rio/chip.tif"
    spec = _spec(url)
    proxy.requests.clear()
    proxy.always = 503
    with pytest.raises(RemoteUnavailable) as err:
        ingest_scan(spec, tmp_path / "chip.zarr")
    assert not isinstance(err.value, ScanError) and isinstance(err.value, ConnectionError)
    message = str(err.value)
    assert message.startswith(f"{url}: ") and "\n" not in message and "3 tries" in message
    assert len(_gets(proxy)) == 3  # AWS_MAX_ATTEMPTS, not more
    assert not (tmp_path / "chip.zarr").exists()

    from flows.cli import app

    result = CliRunner().invoke(app, ["ingest", url, "--store", str(tmp_path / "cli.zarr"),
                                      "--modality", "satellite"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1 and url in errors[0], result.output


@pytest.mark.parametrize("status", [403, 404])
def test_a_permanent_error_is_one_line_at_once(faulty_s3, tmp_path, status):
    s3, proxy = faulty_s3
    url = f"{s3.url}/rio/chip.tif"
    spec = _spec(url)
    proxy.requests.clear()
    proxy.always = status
    with pytest.raises(ScanError) as err:
        ingest_scan(spec, tmp_path / "chip.zarr")
    assert str(err.value).startswith(f"{url}: ") and "\n" not in str(err.value)
    assert len(_gets(proxy)) == 1  # no retry of an answer that will not change


# ---- the registry's download -------------------------------------------------------------------

@pytest.fixture
def registry_over_http(tmp_path, monkeypatch):
    """A sqlite registry whose experiment keeps artifacts on a fake mlflow-artifacts server."""
    import mlflow
    from safetensors.numpy import save

    from models import registry
    from models.card import ModelCard

    card = ModelCard(architecture="unet", classes=["bg", "fg"], in_channels=1, spatial_dims=2, tile=[64, 64])
    files = {"card.json": card.model_dump_json().encode(), "weights.safetensors": save({"w": np.ones(3, np.float32)})}
    prefix = "/api/2.0/mlflow-artifacts/artifacts"

    def respond(method, path, headers, body):
        parts = urlsplit(path)
        if parts.path == prefix:  # a listing: a file is not a folder
            return 200, {"Content-Type": "application/json"}, json.dumps({"files": []}).encode()
        name = parts.path.rsplit("/", 1)[-1]
        if name in files:
            return 200, {"Content-Type": "application/octet-stream"}, files[name]
        return 404, {"Content-Type": "application/json"}, b'{"error_code": "RESOURCE_DOES_NOT_EXIST"}'

    server = FaultServer(respond=respond)
    original = os.environ.get("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("TILEWISE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # the count is under test, not the waits
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    c = registry.client()
    experiment = c.create_experiment("remote", artifact_location=f"{server.url}{prefix}/remote")
    model = c.create_logged_model(experiment)
    c.create_registered_model("toy")
    c.create_model_version("toy", source=f"models:/{model.model_id}", model_id=model.model_id)
    yield server
    server.close()
    mlflow.set_tracking_uri(original)
    mlflow.set_registry_uri(original)


def _downloads(server) -> list:
    return [r for r in server.requests if urlsplit(r[1]).path.rsplit("/", 1)[-1] in ("card.json", "weights.safetensors")]


def test_registry_download_retries_a_transient_fault(registry_over_http):
    from models import registry

    registry_over_http.fail_next(503, 503)
    card, state, identity, _ = registry.registered_weights("models:/toy/1")
    assert card.classes == ["bg", "fg"] and identity == "models:/toy/1"
    np.testing.assert_array_equal(state["w"], np.ones(3, np.float32))


def test_registry_that_keeps_failing_is_unavailable_not_no_model(registry_over_http):
    from models import registry

    registry_over_http.always = 503
    with pytest.raises(registry.RegistryUnavailable) as err:
        registry.registered_weights("models:/toy/1")
    assert isinstance(err.value, ConnectionError) and "\n" not in str(err.value)
    assert len(registry_over_http.requests) == 1 + 3  # one try and MLFLOW_HTTP_REQUEST_MAX_RETRIES


def test_registry_download_refused_is_one_line_at_once(registry_over_http):
    from models import registry

    registry_over_http.always = 403
    with pytest.raises(registry.RegistryError) as err:
        registry.registered_weights("models:/toy/1")
    assert not isinstance(err.value, ConnectionError) and "\n" not in str(err.value)
    assert len(registry_over_http.requests) == 1
