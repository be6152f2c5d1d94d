# Azolla image: the orchestrator (default command), the shepherd and the azolla CLI.
#
#   docker build -t azolla .
#   docker run -e DATABASE_URL=postgresql://... -p 52710:52710 azolla
#   docker run -e AZOLLA_ORCHESTRATOR=http://server:52710 -e AZOLLA_TASKS=myapp.tasks \
#       azolla azolla-shepherd
#   docker run --rm -e DATABASE_URL=postgresql://... azolla azolla migrate
#
# It follows docs/deploying.md. NOTE: the environment this was written in has no Docker engine,
# so this file (and docker-compose.yml) could not be built or run there; the commands it runs
# are the ones the test suite exercises outside containers.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels \
 && useradd --system --create-home --home-dir /var/lib/azolla --shell /usr/sbin/nologin azolla
USER azolla
WORKDIR /var/lib/azolla
# Listen on the container's interfaces (the default, 127.0.0.1, is unreachable from outside);
# configure tokens and TLS before exposing the port beyond a private network.
ENV AZOLLA_HOST=0.0.0.0 \
    AZOLLA_LOG_FORMAT=json \
    AZOLLA_METRICS_HOST=0.0.0.0
EXPOSE 52710 9464
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD \
  python -c "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
r = g.HealthStub(grpc.insecure_channel('127.0.0.1:52710')).Check(h.HealthCheckRequest(), timeout=4); \
sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"
CMD ["azolla-server"]
