# The Fly.io image of the example app on ltxfs (see docs/deploy-fly.md).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bin ltxfs --example app

FROM debian:bookworm-slim
# fuse3 for the mount, sqlite3 for the migrations, ca-certificates for nothing
# ltxfs needs (it carries its own roots) but for tools in the image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 sqlite3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/ltxfs /usr/local/bin/ltxfs
COPY --from=build /src/target/release/examples/app /usr/local/bin/app
COPY deploy/fly/ltxfs.yml /etc/ltxfs.yml
# ltxfs mounts /ltxfs, runs the exec commands of /etc/ltxfs.yml, and forwards
# signals to the app: on SIGTERM (a deploy) the primary hands its role over.
ENTRYPOINT ["ltxfs", "mount"]
