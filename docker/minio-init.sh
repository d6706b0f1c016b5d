#!/bin/sh
# One-shot (compose service minio-init): the buckets, and the S3 user that MLflow and the
# tilewise worker use (read-write on those buckets only), so the MinIO root credentials stay with
# the administrator. Idempotent: safe on every `docker compose up`.
set -eu
mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing local/mlflow local/tilewise
cat > /tmp/tilewise-rw.json <<JSON
{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:*"],
  "Resource": ["arn:aws:s3:::mlflow", "arn:aws:s3:::mlflow/*", "arn:aws:s3:::tilewise", "arn:aws:s3:::tilewise/*"]}]}
JSON
mc admin policy create local tilewise-rw /tmp/tilewise-rw.json
mc admin user add local "$S3_ACCESS_KEY" "$S3_SECRET_KEY"
mc admin policy attach local tilewise-rw --user "$S3_ACCESS_KEY" || true   # already attached on a re-run
