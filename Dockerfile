# Shipyard for docker-compose.yml: one image for handlers and the gateway.
# Builders run inside the handler's container: INSTALL_CLAUDE=1 adds the Claude Code CLI.
FROM python:3.11-slim

ARG INSTALL_CLAUDE=0
ARG CLAUDE_CODE_VERSION=2.1.330
RUN if [ "$INSTALL_CLAUDE" = "1" ]; then \
      apt-get update && apt-get install -y --no-install-recommends nodejs npm git \
      && npm install -g "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}" \
      && rm -rf /var/lib/apt/lists/*; \
    fi

RUN useradd --create-home --uid 1000 shipyard
WORKDIR /opt/shipyard
COPY pyproject.toml README.md ./
COPY shipyard ./shipyard
RUN pip install --no-cache-dir . && mkdir -p /data /work && chown shipyard /data /work

USER shipyard
ENV SHIPYARD_DATA_DIR=/data SHIPYARD_WORKDIR_ROOTS=/work
ENTRYPOINT []
CMD ["shipyard", "up"]
