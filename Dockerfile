FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml setup.cfg README.md LICENSE ./
COPY userli_postfix ./userli_postfix
COPY twisted ./twisted
RUN pip install . \
    # Twisted rewrites a stale plugin cache at start-up; the non-root user
    # cannot, so build it now.
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && cd / && rm -rf /src \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin userli-postfix

USER userli-postfix
WORKDIR /
# Not 10006: the SASL listener (off by default) must only be published on
# the host's loopback, by hand, never by `docker run -P`.
EXPOSE 10001 10002 10003

HEALTHCHECK --interval=30s --timeout=3s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:10002/health', timeout=2).status != 200)"

# --pidfile= : a pid file left by a killed container would block the next start.
CMD ["twistd", "-n", "--pidfile=", "userli-postfix"]
