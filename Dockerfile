# Build the wheel (with the compiled core) in one stage, run it in a slim one.

FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY fastws ./fastws
RUN pip install --no-cache-dir build \
    && python -m build --wheel --outdir /wheels .

FROM python:3.11-slim AS runtime
RUN useradd --create-home --uid 10001 fastws
COPY --from=build /wheels /wheels
# The wheel built above with its `redis` extra: a node started with FASTWS_REDIS
# (deploy/compose.yaml, deploy/kubernetes/) needs redis-py and stops at start
# without it. The wheel is named by its path, so that no other `fastws` an
# index might offer can be picked instead.
RUN wheel=$(echo /wheels/fastws-*.whl) \
    && pip install --no-cache-dir "${wheel}[redis]" \
    && rm -rf /wheels
# By number, not name: Kubernetes' runAsNonRoot can check a number only.
USER 10001:10001
ENV FASTWS_HOST=0.0.0.0 \
    FASTWS_PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["fastws"]
CMD ["serve"]
