# The userli-postfix image.  Build (BuildKit: Docker 23+ does so by default):
#
#   docker build -t userli-postfix .
#
# BASE_IMAGE is any Debian-like image with Python >= 3.11 and its venv
# module (the default is the official slim Python image).  Behind a private
# package index or a TLS-intercepting proxy, hand pip its configuration and
# CA bundle as build secrets; they are mounted for the one pip step only and
# are in no layer of any stage:
#
#   docker build --secret id=pip.conf,src=$HOME/.config/pip/pip.conf \
#       --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt -t userli-postfix .
ARG BASE_IMAGE=python:3.12-slim

# Builder: a virtualenv with the daemon and its dependencies (binary wheels;
# no compiler).  Only the finished virtualenv goes on to the runtime image.
FROM ${BASE_IMAGE} AS builder
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.cfg README.md LICENSE ./
COPY userli_postfix ./userli_postfix
COPY twisted ./twisted
RUN --mount=type=secret,id=pip.conf --mount=type=secret,id=pip-ca \
    set -e; \
    if [ -s /run/secrets/pip.conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip.conf; fi; \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi; \
    python3 -m venv /opt/userli-postfix; \
    /opt/userli-postfix/bin/python -m pip install . ; \
    # Twisted rewrites a stale plugin cache at start-up; the non-root user
    # cannot, so it is built now.
    /opt/userli-postfix/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"; \
    # pip is not needed at run time.
    /opt/userli-postfix/bin/python -m pip uninstall -q -y pip setuptools wheel 2>/dev/null || true
COPY deploy/docker/healthcheck.py /opt/userli-postfix/healthcheck.py

# Runtime: the base image, the virtualenv and an unprivileged user.
FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/userli-postfix/bin:$PATH
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin userli-postfix
COPY --from=builder /opt/userli-postfix /opt/userli-postfix
USER 10001:10001
WORKDIR /

# Only what is on by default: socketmap, metrics/health, policy.  SASL
# (SASL_LISTEN_ADDR) is off unless configured; when on, publish it on
# loopback only or use a UNIX socket in a volume (see README, Deploying).
EXPOSE 10001 10002 10003

# /health on whatever METRICS_LISTEN_ADDR says (TCP or a UNIX socket).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python3", "-I", "/opt/userli-postfix/healthcheck.py"]

# twistd is PID 1: it handles SIGTERM itself (stops accepting, finishes what
# is in flight, exits 0) and reaps its worker processes.
# --pidfile= : a pid file left by a killed container would block the next start.
STOPSIGNAL SIGTERM
CMD ["twistd", "-n", "--pidfile=", "userli-postfix"]
