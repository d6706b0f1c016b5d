#!/bin/sh
# One-shot (compose service minio-init): the buckets, and the S3 user that MLflow and the
# tilewise worker use, so the MinIO root credentials stay with the administrator. Its policy is
# object operations on the two buckets only (list, read, write, delete objects; multipart
# uploads): no bucket administration (no PutBucketPolicy, DeleteBucket, lifecycle, versioning,
# replication ...), no other bucket. Idempotent: safe on every `docker compose up`.
set -eu
mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing local/mlflow local/tilewise
cat > /tmp/tilewise-rw.json <<JSON
{"Version": "2012-10-17", "Statement": [
  {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"],
   "Resource": ["arn:aws:s3:::mlflow", "arn:aws:s3:::tilewise"]},
  {"Effect": "Allow",
   "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
   "Resource": ["arn:aws:s3:::mlflow/*", "arn:aws:s3:::tilewise/*"]}]}
JSON
# create, or replace the policy an older version of this script made (it granted s3:*)
mc admin policy create local tilewise-rw /tmp/tilewise-rw.json
mc admin user add local "$S3_ACCESS_KEY" "$S3_SECRET_KEY"
mc admin policy attach local tilewise-rw --user "$S3_ACCESS_KEY" || true   # already attached on a re-run
