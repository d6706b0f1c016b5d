"""One-shot (compose service mlflow-init): the worker's own MLflow user, so the worker never holds
the admin's password. Run with the admin's credentials (MLFLOW_TRACKING_USERNAME / _PASSWORD).

The server's default permission is NO_PERMISSIONS (docker/mlflow-entrypoint.sh). The worker user
is created (its password set from .env on every run) and kept a non-admin; it gets EDIT -- create
runs, log to them, register versions, set aliases; never delete a resource nor grant rights -- on
every existing ``tilewise/*`` experiment and registered model. What the worker creates itself it
owns (MLflow gives the creator MANAGE on it). Experiments or models someone else creates later get
the grant the next time this runs (every ``docker compose up``). Idempotent.
"""

import os

from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.server.auth.client import AuthServiceClient

WORKER_PERMISSION = "EDIT"


def already_there(exc: MlflowException) -> bool:
    return exc.error_code == "RESOURCE_ALREADY_EXISTS"


def main() -> None:
    uri = os.environ["MLFLOW_TRACKING_URI"]
    user, password = os.environ["MLFLOW_WORKER_USER"], os.environ["MLFLOW_WORKER_PASSWORD"]
    if user == os.environ.get("MLFLOW_TRACKING_USERNAME"):
        raise SystemExit("MLFLOW_WORKER_USER must not be the admin user")
    auth = AuthServiceClient(uri)
    try:
        auth.create_user(user, password)
    except MlflowException as exc:
        if not already_there(exc):
            raise
        auth.update_user_password(user, password)
    auth.update_user_admin(user, False)

    def grant(resource_type: str, resource_id: str) -> None:
        try:
            auth.grant_user_permission(user, resource_type, resource_id, WORKER_PERMISSION)
        except MlflowException as exc:
            if not already_there(exc):
                raise

    client = MlflowClient(uri)
    for experiment in client.search_experiments(view_type=ViewType.ACTIVE_ONLY, filter_string="name LIKE 'tilewise/%'"):
        grant("experiment", experiment.experiment_id)
    for model in client.search_registered_models():
        grant("registered_model", model.name)
    print(f"mlflow-init: user {user} (not an admin), {WORKER_PERMISSION} on tilewise's experiments and models")


if __name__ == "__main__":
    main()
