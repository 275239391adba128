#!/usr/bin/env bash
# Builds the OCI image of one Caravan binary without a container engine
# (umoci), from the binary itself: a root filesystem holding the binary, the
# shared libraries it links (as ldd resolves them on this machine), the CA
# certificates and a non-root user (65532), nothing else — no shell, no
# package manager. `make images` runs it for the release binaries; the
# Dockerfile builds the same images for those with Docker.
#
#   scripts/image.sh BINARY LAYOUT [TAG [MORE...]]
#
# BINARY is target/release/caravan-controller (or -relay, -agent), the
# entrypoint; MORE are binaries the image carries beside it (the
# controller's image: the agent of its release, for --agent-update auto).
# LAYOUT an OCI image layout directory (created if missing) that receives
# the image as TAG (default: the workspace version). Push it with
#   skopeo copy oci:LAYOUT:TAG docker://REGISTRY/caravan-dev/caravan-controller:TAG
set -euo pipefail

bin=$1
layout=$2
here=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$here/Cargo.toml")
tag=${3:-$version}
more=("${@:4}")
name=$(basename "$bin")
command -v umoci >/dev/null || { echo "image.sh: umoci not found (apt-get install umoci; scripts/setup.sh does)" >&2; exit 1; }
for b in "$bin" "${more[@]}"; do
  [ -x "$b" ] || { echo "image.sh: $b is not an executable" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/tmp" "$root/var/lib/caravan" "$root/home/nonroot"
for b in "$bin" "${more[@]}"; do
  install -m 0755 "$b" "$root/usr/local/bin/$(basename "$b")"
  # The shared libraries and the dynamic loader, at the paths the binary asks for.
  ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
done
cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
chmod 1777 "$root/tmp"
chown -R 65532:65532 "$root/var/lib/caravan" "$root/home/nonroot"

[ -d "$layout" ] || umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci unpack --image "$layout:$tag" "$work/bundle" >/dev/null
cp -a "$root/." "$work/bundle/rootfs/"
umoci repack --image "$layout:$tag" "$work/bundle"
umoci config --image "$layout:$tag" \
  --os linux --architecture amd64 \
  --config.entrypoint "/usr/local/bin/$name" \
  --config.user 65532:65532 \
  --config.workingdir / \
  --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  --config.label "org.opencontainers.image.title=$name" \
  --config.label "org.opencontainers.image.version=$version" \
  --config.label "org.opencontainers.image.source=https://example.invalid/caravan"
umoci gc --layout "$layout"
echo "$layout:$tag"
