"""Shared test set-up: an isolated TILEWISE_HOME, the sample data, one Prefect server per session."""

from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data_catalog" / "samples"

# Before anything imports flows/ or Prefect: keep every test run's state out of the user's home.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="tilewise-test-home-"))
os.environ["TILEWISE_HOME"] = str(_SESSION_HOME)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)



def _torch_threads_kept():
    """Fail what leaves torch on another thread count than it found: the count is process-wide, so
    a leak would make every later test depend on the order the tests ran in. (Checked only where
    torch was imported before; importing it here would cost every test 2 s.)"""
    import sys

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    if before is not None and torch.get_num_threads() != before:
        after = torch.get_num_threads()
        torch.set_num_threads(before)
        pytest.fail(f"torch was left on {after} thread(s), not {before}: use the one_thread or "
                    f"torch_threads fixture, or restore the count", pytrace=False)


# A test's own change, and a module fixture's (which a test-level check would record as "before").
torch_threads_kept_by_test = pytest.fixture(autouse=True)(_torch_threads_kept)
torch_threads_kept_by_module = pytest.fixture(autouse=True, scope="module")(_torch_threads_kept)


@pytest.fixture
def one_thread():
    """torch on one thread for the test, then as it was: on a shared 2-core machine one thread is
    fastest for the small networks tests train and run."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def torch_threads(request):
    """torch on one thread, then on two (where the engine splits each batch over two lanes on a
    CPU: ``tasks.engine.runner.Lanes``), then as it was."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def prefect_server():
    """One embedded Prefect API for the whole session (it takes ~15 s to start)."""
    import flows  # noqa: F401  (embedded defaults)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


class _S3:
    """A bucket on the local S3 server, with the requests the server received (method, path, query)."""

    def __init__(self, server, endpoint: str, bucket: str):
        import boto3

        self.server, self.endpoint, self.bucket = server, endpoint, bucket
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.client.create_bucket(Bucket=bucket)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}"

    def put(self, key: str, data: bytes | Path) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=Path(data).read_bytes() if isinstance(data, Path) else data)

    def upload_tree(self, local: Path, prefix: str) -> None:
        for path in sorted(local.rglob("*")):
            if path.is_file():
                self.put(f"{prefix}/{path.relative_to(local).as_posix()}", path)

    def set_mtime(self, key: str, when) -> None:
        """Give the object ``key`` this LastModified (an aware datetime): S3 sets it on upload only,
        so the server's own record of the object is changed (moto runs in this process)."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        obj = s3_backends[DEFAULT_ACCOUNT_ID]["global"].buckets[self.bucket].keys[key]
        obj.last_modified = when.astimezone(datetime.timezone.utc).replace(tzinfo=None)  # moto keeps naive UTC

    def object_gets(self) -> list[str]:
        """Paths of the GetObject requests so far (GETs of a key, not bucket listings)."""
        out = []
        for method, path, query in self.server.requests:
            parts = path.lstrip("/").split("/", 1)
            if method == "GET" and len(parts) == 2 and parts[1] and "list-type" not in query:
                out.append(path)
        return out

    def forget_requests(self) -> None:
        self.server.requests.clear()


@pytest.fixture(scope="session")
def _moto_server():
    """One moto S3 server on 127.0.0.1 (a free port) for the session, counting what it receives."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    server.requests = []
    wsgi = server._server.app

    def counting(environ, start_response):
        server.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")))
        return wsgi(environ, start_response)

    server._server.app = counting
    host, port = server._server.server_address[:2]
    yield server, f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(_moto_server, monkeypatch):
    """A fresh bucket on the local S3 server; s3fs reaches it through AWS_ENDPOINT_URL."""
    import uuid

    import s3fs

    server, endpoint = _moto_server
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                        "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached filesystem keeps the endpoint it was made with
    bucket = _S3(server, endpoint, f"tilewise-{uuid.uuid4().hex[:12]}")
    server.requests.clear()
    yield bucket
    s3fs.S3FileSystem.clear_instance_cache()
