# Builds every TAI binary once; the compose stack runs each from this image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --workspace --bins \
 && mkdir /out \
 && cp target/release/payment-system target/release/deployment-system \
       target/release/sandbox-gateway target/release/stress-payment /out/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 tai
COPY --from=build /out/ /usr/local/bin/
COPY config/ /etc/tai/
USER tai
ENV LOG_FORMAT=json RUST_LOG=info
