# The Edgewise edge agent as a container image (docs/deploy.md). Build from the repository root:
#   docker build -f deploy/container/agent.Dockerfile -t edgewise-agent:0.1.0 .
# Base image pinned to one Python release on one Debian release; pin its digest too when you
# build for production (docker buildx imagetools inspect python:3.11.11-slim-bookworm).
ARG BASE=python:3.11.11-slim-bookworm

# -- build: a virtualenv with the base install (edge node only), versions from the lock file
FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY deploy/constraints-edge.txt ./
RUN python -m venv --without-pip /opt/edgewise \
 && python -m pip --python /opt/edgewise/bin/python install \
      -c constraints-edge.txt .

# -- runtime: Python, the virtualenv, a user; no pip, no compiler, no sources
FROM ${BASE}
RUN python -m pip uninstall -y -q pip setuptools wheel \
 && groupadd --system --gid 10001 edgewise \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/edgewise \
      --shell /usr/sbin/nologin edgewise \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/edgewise /var/lib/edgewise/agent
COPY --from=build /opt/edgewise /opt/edgewise
ENV PATH=/opt/edgewise/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    EDGEWISE_LOG_FORMAT=json
USER 10001:10001
WORKDIR /var/lib/edgewise
VOLUME ["/var/lib/edgewise/agent"]
EXPOSE 9464
ENTRYPOINT ["edgewise"]
CMD ["agent", "launch", "--data", "/var/lib/edgewise/agent", "--metrics", "0.0.0.0:9464"]
