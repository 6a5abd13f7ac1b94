# sva-node image. Build from the repository root:
#   docker build -f images/sva-node.Dockerfile -t sva-node:0.1.0 .
# Built with the `kubernetes` feature: in a cluster the nodes use their volume's Lease as the
# witness (mirror.witness.kubernetesLease in the config the operator renders).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release -p sva-node --features kubernetes && cp target/release/sva-node /sva-node

# distroless/cc: glibc + libgcc only; runs as uid 65532 (the pod sets the same).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /sva-node /usr/local/bin/sva-node
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sva-node"]
CMD ["serve", "--config", "/etc/sva/node.yaml"]
