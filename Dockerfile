# The site-recovery services in one image: docker build -t site-recovery:0.1.0 .
# Stage 1 builds every binary; stage 2 holds only them, the entrypoint and what it calls (sh,
# getent, awk, grep from the base image), and runs as an unprivileged user.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --locked --release \
      -p config-server -p process-server -p master-target -p mobility-agent -p srctl \
    && mkdir /out \
    && cp target/release/config-server target/release/process-server target/release/master-target \
          target/release/mobility-agent target/release/srctl /out/

FROM debian:bookworm-slim
RUN groupadd --gid 10001 sr && useradd --uid 10001 --gid sr --no-create-home --home-dir /data sr \
    && mkdir -p /data /etc/site-recovery/bin /etc/site-recovery/config /etc/site-recovery/registration \
    && chown sr:sr /data && chmod 0700 /data
COPY --from=build /out/ /usr/local/bin/
COPY charts/site-recovery/files/entrypoint.sh /etc/site-recovery/bin/entrypoint.sh
# One entrypoint per component; the chart mounts its own copy of entrypoint.sh over this one.
RUN for c in config-server process-server master-target; do \
      printf '#!/bin/sh\nexec /bin/sh /etc/site-recovery/bin/entrypoint.sh %s "$@"\n' "$c" > "/usr/local/bin/sr-$c"; \
      chmod 0755 "/usr/local/bin/sr-$c"; \
    done
USER 10001:10001
VOLUME /data
EXPOSE 9443/tcp 9102/tcp 9201/udp 9103/tcp 9202/udp 10809/tcp
ENTRYPOINT ["/usr/local/bin/sr-config-server"]
