# Sourced by wheels.sh and site-packages.sh: the pip options that select cp311 aarch64 wheels.
# pip does not widen platform tags, so every manylinux_2_N_aarch64 tag glibc 2.36 (bookworm) accepts is listed.
AARCH64_PIP_OPTS="--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none"
AARCH64_PIP_OPTS="$AARCH64_PIP_OPTS --platform manylinux2014_aarch64 --platform linux_aarch64 --platform any"
for n in $(seq 17 36); do AARCH64_PIP_OPTS="$AARCH64_PIP_OPTS --platform manylinux_2_${n}_aarch64"; done
