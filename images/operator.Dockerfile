# sva-operator image. Build from the repository root:
#   docker build -f images/operator.Dockerfile -t sva-operator:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release -p sva-operator --bin sva-operator && cp target/release/sva-operator /sva-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /sva-operator /usr/local/bin/sva-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sva-operator"]
