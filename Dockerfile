FROM python:3.11-slim
WORKDIR /app
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY atlas atlas
COPY indexer indexer
COPY api api
COPY viewer viewer
# EXTRAS="[ray]" for the images of a Ray cluster (docker-compose.yml, profile "ray")
ARG EXTRAS=""
RUN pip install --no-cache-dir -e ".${EXTRAS}"
ENV ATLAS_HOME=/data/atlas
EXPOSE 8000
CMD ["sh", "-c", "cellatlas serve --home $ATLAS_HOME --host 0.0.0.0 --port 8000"]
