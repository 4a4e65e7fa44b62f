# swarm itself, for docker-compose.yml's services (redis, sim, coordinator, worker): the
# `swarm` command in /opt/swarm, plus redis-server and git (the output repository's merges).
#
# With a registry:  docker build -t swarm:latest .
# Offline (scripts/provision.sh does this): wheels made on the host, a locally made base:
#   pip wheel -w build/wheels . && docker build --build-arg BASE=swarm-base:bookworm-2 \
#       --build-arg PIP_NO_INDEX=1 -t swarm:latest .
ARG BASE=python:3.12-slim
FROM ${BASE}

# The offline base lacks redis-server and venv; a slim image from a registry lacks git too.
RUN set -eu; \
    need=""; \
    command -v redis-server >/dev/null 2>&1 || need="$need redis-server"; \
    command -v git >/dev/null 2>&1 || need="$need git"; \
    python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need="$need python3-venv"; \
    if [ -n "$need" ]; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $need; \
        rm -rf /var/lib/apt/lists/*; \
    fi

# build/wheels holds the dependencies' wheels when the build cannot reach a registry
# (PIP_NO_INDEX=1); the [s] glob lets the build go on when that folder does not exist.
# Dependencies first, from pyproject.toml alone, so a change to swarm/ reuses their layer.
ARG PIP_NO_INDEX=
COPY build/wheel[s] /tmp/wheels/
COPY pyproject.toml /src/
RUN touch /src/README.md \
    && python3 -m venv /opt/swarm \
    && PIP_NO_INDEX="$PIP_NO_INDEX" /opt/swarm/bin/pip install --no-cache-dir \
        --disable-pip-version-check --find-links /tmp/wheels /src
COPY README.md /src/
COPY swarm /src/swarm
RUN PIP_NO_INDEX="$PIP_NO_INDEX" /opt/swarm/bin/pip install --no-cache-dir \
        --disable-pip-version-check --find-links /tmp/wheels --no-deps --force-reinstall /src \
    && rm -rf /src /tmp/wheels \
    && /opt/swarm/bin/swarm --version

ENV PATH=/opt/swarm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/lib/swarm
ENTRYPOINT ["swarm"]
CMD ["--help"]
