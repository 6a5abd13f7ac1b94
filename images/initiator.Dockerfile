# Test initiator for kind/e2e.sh: userspace iSCSI clients only (no kernel initiator needed).
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libiscsi-bin qemu-utils qemu-block-extra \
    && rm -rf /var/lib/apt/lists/*
USER 65532:65532
CMD ["sleep", "infinity"]
