# invite-mailer as a container: the daemon (`invite-mailer run`) by default; any
# other command works too, e.g. `docker compose run --rm invite-mailer plan`.
#
#   /app/config      read-only mount: settings.toml, series.yaml, contacts, ...
#   /app/templates   read-only mount: email/ templates
#   /app/state       writable volume: the delivery ledger and the heartbeat (back it up)
#   /app/outbox      writable: .eml files of the outbox transport
#
# Neither config nor templates are baked in: a container started without them
# stops with a clear error instead of running the example series.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the project and its dependencies into a venv ------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/invite-mailer
WORKDIR /src
# README.md is part of the package metadata (pyproject: readme).
COPY pyproject.toml README.md ./
COPY src/ src/
RUN /opt/invite-mailer/bin/pip install --no-cache-dir .

# --- runtime ------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

# tini as PID 1: forwards SIGTERM/SIGINT/SIGHUP to the daemon (graceful stop,
# reload) and reaps zombies, so the image behaves without `init: true`.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 invite-mailer \
 && useradd --system --uid 10001 --gid invite-mailer --no-create-home \
        --home-dir /app --shell /usr/sbin/nologin invite-mailer

COPY --from=build /opt/invite-mailer /opt/invite-mailer

# No TZ: the schedule is computed in the series' own time zone (series.yaml
# `timezone`, Europe/Berlin) from the zone data of the `tzdata` wheel, whatever
# the container's clock zone is. Log timestamps are UTC in the JSON log format.
ENV PATH=/opt/invite-mailer/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    INVITE_MAILER_STATE__URL=sqlite:////app/state/invite-mailer.db \
    INVITE_MAILER_TRANSPORT__OUTBOX_DIR=/app/outbox

WORKDIR /app
# state/ and outbox/ belong to the service user: a new named volume mounted on
# /app/state takes over this owner. config/ and templates/ are mount points.
RUN mkdir -p config templates state outbox \
 && chown invite-mailer:invite-mailer state outbox \
 && chmod 0750 state outbox

USER invite-mailer:invite-mailer
VOLUME ["/app/state"]
# The one-click unsubscribe endpoint, when INVITE_MAILER_UNSUBSCRIBE__SERVE=true
# (with INVITE_MAILER_UNSUBSCRIBE__BIND_HOST=0.0.0.0 inside a container).
EXPOSE 8080

# The daemon finishes the mails in flight on SIGTERM (up to 30 s); give it time
# with `docker stop --time 60` / compose `stop_grace_period: 60s`.
STOPSIGNAL SIGTERM

# The daemon writes a heartbeat into /app/state after every wake-up (at least
# once a minute); `invite-mailer health` exits 1 when it is missing or stale.
HEALTHCHECK --interval=60s --timeout=15s --start-period=120s --retries=3 \
    CMD ["invite-mailer", "health"]

ENTRYPOINT ["tini", "--", "invite-mailer"]
CMD ["run"]
