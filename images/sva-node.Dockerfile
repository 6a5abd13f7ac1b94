# sva-node image. Build from the repository root:
#   docker build -f images/sva-node.Dockerfile -t sva-node:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release -p sva-node && cp target/release/sva-node /sva-node

# distroless/cc: glibc + libgcc only; runs as uid 65532 (the pod sets the same).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /sva-node /usr/local/bin/sva-node
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sva-node"]
CMD ["serve", "--config", "/etc/sva/node.yaml"]
