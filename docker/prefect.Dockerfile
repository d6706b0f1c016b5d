# Prefect 3.8.8 server. SQLAlchemy is held below 2.1: with SQLAlchemy 2.1 the server's scheduler
# fails on every loop ("Can't evaluate bulk DML statement; please supply a bulk_dml decorated
# function", prefect/server/models/deployments.py _insert_scheduled_flow_runs) and no scheduled run
# is ever created. asyncpg for the PostgreSQL database.
FROM prefecthq/prefect:3.8.8-python3.11
RUN pip install --no-cache-dir "sqlalchemy[asyncio]>=2.0,<2.1" asyncpg
