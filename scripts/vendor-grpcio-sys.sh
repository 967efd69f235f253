#!/usr/bin/env bash
# Prepares vendor/grpcio-sys: the registry's grpcio-sys crate (gRPC C-core
# 1.56.2, fetched and checksum-verified by cargo) with our patches from
# patches/grpcio-sys/ applied. Cargo.toml's [patch.crates-io] builds it in
# place of the registry copy. No newer grpcio-sys is published, and 1.56.2
# predates upstream's HTTP/2 rapid-reset defences (CVE-2023-44487); the
# patches add them (see patches/grpcio-sys/*.patch). Run by scripts/setup.sh;
# does nothing when vendor/grpcio-sys already matches the patches.
set -euo pipefail
cd "$(dirname "$0")/.."

version="0.13.0+1.56.2-patched"
dest="vendor/grpcio-sys"
stamp="$(cat patches/grpcio-sys/*.patch | sha256sum | cut -d' ' -f1) $version"
if [ -f "$dest/.contact-patches" ] && [ "$(cat "$dest/.contact-patches")" = "$stamp" ]; then
    exit 0
fi
command -v patch >/dev/null 2>&1 || { echo "vendor-grpcio-sys: the patch command is missing (apt-get install patch)" >&2; exit 1; }

# Let cargo fetch (and verify) the crate through a throw-away manifest that
# does not depend on vendor/ itself.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/src"
: > "$tmp/src/lib.rs"
cat > "$tmp/Cargo.toml" <<TOML
[package]
name = "fetch-grpcio-sys"
version = "0.0.0"
edition = "2021"
[dependencies]
grpcio-sys = "=$version"
TOML
echo "vendor-grpcio-sys: fetching grpcio-sys $version" >&2
cargo fetch --quiet --manifest-path "$tmp/Cargo.toml"
crate="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"grpcio-sys-$version.crate" | head -n 1)"

rm -rf "$dest.tmp"
mkdir -p "$dest.tmp"
tar -xzf "$crate" -C "$dest.tmp" --strip-components=1
for p in patches/grpcio-sys/*.patch; do
    echo "vendor-grpcio-sys: applying $p" >&2
    patch -d "$dest.tmp" -p1 --batch --forward --quiet < "$p"
done
echo "$stamp" > "$dest.tmp/.contact-patches"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "vendor-grpcio-sys: $dest is ready" >&2
