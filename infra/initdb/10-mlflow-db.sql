-- The Postgres container creates the `prefect` database; MLflow gets its own.
CREATE DATABASE mlflow;
