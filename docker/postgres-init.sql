-- Runs once, on the first start of an empty data volume, as POSTGRES_USER (owner of the new
-- databases). Prefect uses POSTGRES_DB (`prefect`); MLflow gets its tracking database and the
-- database of its basic-auth users.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
