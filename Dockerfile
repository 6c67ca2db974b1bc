# trimta in a container: the daemon in the foreground as a non-root user.
#   docker build -t trimta .
#   docker run -p 2525:2525 -v trimta-spool:/var/spool/trimta \
#       -v trimta-mail:/var/mail/trimta trimta
FROM python:3.11-slim

RUN useradd --system --uid 10025 --home-dir /var/spool/trimta trimta \
    && mkdir -p /var/spool/trimta /var/mail/trimta /etc/trimta \
    && chown trimta:trimta /var/spool/trimta /var/mail/trimta

COPY pyproject.toml README.md /src/
COPY trimta /src/trimta
RUN python -m pip install --no-cache-dir /src && rm -rf /src

COPY conf/container.toml /etc/trimta/trimta.toml

USER trimta
VOLUME ["/var/spool/trimta", "/var/mail/trimta"]
EXPOSE 2525
STOPSIGNAL SIGTERM
CMD ["trimta", "serve", "--config", "/etc/trimta/trimta.toml"]
