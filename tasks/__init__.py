"""The work of tilewise as plain functions (no Prefect imports here; flows/ wraps them)."""
