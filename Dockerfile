# FleetGate's container image: the gateway alone, as a non-root user, with nothing secret in it.
#
# Config and secrets arrive at run time, never at build time: mount the config at
# /etc/fleetgate/gw.yaml (read-only) and pass the secrets it names as ${VAR} in the environment
# (compose.yaml does both, from .env). .dockerignore lets only the package into the build
# context, so a stray .env or database can't be copied in. See docs/deploy.md.
#
#   docker build -t fleetgate .
#   docker run --rm -p 127.0.0.1:8000:8000 --env-file .env \
#       -v "$PWD/gw.yaml:/etc/fleetgate/gw.yaml:ro" fleetgate

# -- build: a virtualenv with FleetGate and the PostgreSQL driver, copied whole below ------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fleetgate ./fleetgate
RUN python -m venv /opt/fleetgate \
 && /opt/fleetgate/bin/pip install '.[postgres]'

# -- runtime: no compiler, no pip cache, no sources, no root -------------------------------------
FROM python:3.11-slim
ENV PATH=/opt/fleetgate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# A fixed numeric uid/gid, so orchestrators can check runAsNonRoot and volumes can be chowned.
RUN groupadd --system --gid 10001 fleetgate \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/fleetgate --create-home \
        --shell /usr/sbin/nologin fleetgate \
 && install -d -o root -g 10001 -m 0750 /etc/fleetgate
COPY --from=build /opt/fleetgate /opt/fleetgate
COPY deploy/healthcheck.py /opt/fleetgate/healthcheck.py
USER 10001:10001
# The working directory holds fleet.state_dir's default (.fleetgate/state): writable, private.
WORKDIR /var/lib/fleetgate
EXPOSE 8000
# Liveness only (GET /health). The slim image has no curl: the check is standard-library Python.
# With server.tls or another port, set FLEETGATE_HEALTH_URL (https://127.0.0.1:8000/health).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/fleetgate/healthcheck.py"]
ENTRYPOINT ["fleetgate"]
CMD ["serve", "--config", "/etc/fleetgate/gw.yaml", "--host", "0.0.0.0"]
