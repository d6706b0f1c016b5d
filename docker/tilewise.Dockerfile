FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY data_catalog ./data_catalog
COPY flows ./flows
COPY tasks ./tasks
COPY models ./models
RUN pip install --no-cache-dir -c constraints.txt -e . s3fs
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false
