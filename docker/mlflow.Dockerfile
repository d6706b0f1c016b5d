# MLflow tracking server + registry, basic auth (mlflow[auth]), PostgreSQL backend, S3 (MinIO) artifacts.
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" psycopg2-binary boto3
COPY docker/mlflow-entrypoint.sh /usr/local/bin/mlflow-entrypoint
RUN chmod 0755 /usr/local/bin/mlflow-entrypoint && useradd --create-home mlflow
USER mlflow
ENTRYPOINT ["/usr/local/bin/mlflow-entrypoint"]
CMD ["--host=0.0.0.0", "--port=5000"]
