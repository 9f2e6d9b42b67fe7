-- Prefect's database is POSTGRES_DB (prefect); MLflow gets its own.
CREATE DATABASE mlflow OWNER llmpress;
