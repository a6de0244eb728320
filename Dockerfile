# RobustKD Studio: the dashboard and the robustkd command, on an official PyTorch CUDA runtime.
#   docker build -t robustkd-studio .
#   docker run --gpus all -p 8501:8501 -v robustkd-runs:/runs robustkd-studio
# Without --gpus the same image runs on the CPU.
#
# Authentication: the app has no login of its own; whoever reaches port 8501 can upload files
# and start runs. On a machine others can reach, publish the port on the loopback address only
#   docker run --gpus all -p 127.0.0.1:8501:8501 -v robustkd-runs:/runs robustkd-studio
# and put a reverse proxy with authentication (and TLS) in front of it, e.g. nginx with
# auth_basic or an OAuth2 proxy; it must pass WebSocket upgrades (see README, "Docker").
FROM pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    ROBUSTKD_RUNS=/runs \
    ROBUSTKD_MAX_RUNS=2 \
    ROBUSTKD_UPLOAD_DAYS=7

# Fashion-MNIST (the default data) from Debian/Ubuntu's package; curl for the health check.
RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# torch and torchvision come with the base image; install the rest without replacing them.
COPY requirements.txt pyproject.toml README.md ./
RUN grep -v -E '^(torch|torchvision|playwright)' requirements.txt > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY robustkd ./robustkd
COPY app ./app
COPY pages ./pages
COPY assets ./assets
COPY .streamlit ./.streamlit
# The library, editable: it finds the shipped teacher in /app/assets (a wheel would carry it as
# robustkd/_assets). The dashboard is not installed: it runs from /app, which `python -m` puts
# on the import path.
RUN pip install --no-deps -e .

# Run as an unprivileged user; runs (reports, checkpoints, uploads) live in a volume.
RUN useradd --create-home --uid 1000 robustkd && mkdir -p /runs && chown robustkd /runs
USER robustkd
VOLUME ["/runs"]

EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fsS http://localhost:8501/_stcore/health || exit 1

CMD ["python", "-m", "streamlit", "run", "app/main.py", "--server.address=0.0.0.0", "--server.port=8501", "--server.headless=true"]
