"""Model builders and the MLflow registry (see the model-zoo issue)."""
