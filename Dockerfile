# The u2s image: every node of a GPU Ray cluster (head, CPU workers, GPU workers) runs it, and so does the
# RayJob's submitter. No step needs a GPU; no model weights are baked in (stages load them by Hugging Face
# id into HF_HOME, from a mounted path, or from s3:// staged copies: docs/scaling.md).
#
#   make image                      # docker build -t u2s:<version> .
#   docker tag u2s:0.1.0 REGISTRY/u2s:0.1.0 && docker push REGISTRY/u2s:0.1.0
#
# Base: Ray's LLM image for Ray 2.60.0, CUDA 13.0, Python 3.12. vllm 0.29.0's wheels run on a CUDA 13.0
# torch (torch 2.13.0 with the nvidia-*-cu13 runtime wheels), so the base's CUDA toolkit (nvcc, for the
# kernels FlashInfer and Triton compile at run time) is the CUDA of that torch; a cu12x base would carry a
# second, unused CUDA and compile kernels against the wrong headers. Ray builds this image for ray[llm]
# 2.60.0 with vllm 0.29.0, so most of the locked packages below are already in its layers and the
# dependency layer stays small. Ray publishes CUDA 13.0 images for Python 3.12 only: the GPU lock is
# resolved for 3.12 (requirements/lock-gpu.sh). GPU nodes need an NVIDIA driver >= 580 (CUDA 13.0).
FROM rayproject/ray-llm:2.60.0-py312-cu130

ENV HF_HOME=/home/ray/.cache/huggingface \
    VLLM_CACHE_ROOT=/home/ray/.cache/vllm \
    U2S_MODEL_CACHE=/home/ray/.cache/u2s-models \
    PYTHONUNBUFFERED=1

# Created by the image's user (ray), so the build can write in it under any builder (kaniko's WORKDIR
# would be root's).
RUN mkdir -p /home/ray/u2s /home/ray/.cache
WORKDIR /home/ray/u2s

# Dependencies first and from the GPU lock alone: editing u2s rebuilds only the small layers below.
# --no-deps: the lock is the complete, resolved set (tests/test_dockerfile.py checks that resolving it
# adds nothing); the same uv as the lock's resolver (the dev extra's pin).
COPY --chown=ray:users requirements/gpu.lock.txt requirements/gpu.lock.txt
RUN pip install --no-cache-dir uv==0.13.10 \
    && uv pip install --system --no-cache --no-deps -r requirements/gpu.lock.txt \
    && python -c "import vllm, ray.data.llm, diffusers, transformers, xgrammar"

COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users u2s ./u2s
# The Ray job entrypoint: python /home/ray/u2s/jobs/anonymize.py --config ... (cluster/kuberay/rayjob.yaml).
COPY --chown=ray:users jobs ./jobs
RUN uv pip install --system --no-cache --no-deps . \
    && python -c "import u2s.cli, vllm, ray.data.llm, diffusers, transformers, xgrammar"
