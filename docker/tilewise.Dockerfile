# The tilewise worker: `tilewise serve` (nightly/<dataset> on each catalog schedule, backfill on
# demand). The same image serves the GPU profile: the PyPI torch wheels carry their CUDA libraries.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md prefect.yaml ./
COPY data_catalog ./data_catalog
COPY flows ./flows
COPY tasks ./tasks
COPY models ./models
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/* \
    && pip install --no-cache-dir -c constraints.txt -e '.[crf]' s3fs \
    && useradd --create-home tilewise && mkdir -p /var/lib/tilewise && chown tilewise /var/lib/tilewise
USER tilewise
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false \
    TILEWISE_HOME=/var/lib/tilewise
CMD ["tilewise", "serve", "--catalog", "/catalog"]
