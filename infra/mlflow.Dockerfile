# MLflow tracking server with what the team setup needs: Postgres driver, boto3 for S3 artifacts, basic auth.
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow==3.17.2" "psycopg2-binary>=2.9" "boto3>=1.43.115,<1.43.118"
EXPOSE 5000
