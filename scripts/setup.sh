#!/usr/bin/env bash
# Installs everything Caravan's demo and tests need on a Debian machine:
# Debian packages (etcd, git, nginx, build tools), and a kube-apiserver plus
# kube-controller-manager v1.20 built from Debian's `kubernetes` source package.
# Slow builds are cached outside the checkout in $CARAVAN_CACHE (default
# ~/.cache/caravan), keyed by version, so later runs take seconds.
set -euo pipefail

CACHE=${CARAVAN_CACHE:-$HOME/.cache/caravan}
K8S_BIN=$CACHE/k8s-v1.20.2/bin
mkdir -p "$CACHE"

log() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo

need_pkgs=()
# docker-registry (the CNCF distribution registry) and apache2-utils
# (htpasswd): the oci cabinet tests run a real registry. libssh2-1-dev: git2's
# ssh transport. nginx-light, fcgiwrap and openssh-server: the Git hosts
# (git http-backend over HTTPS, sshd) the GitSource tests run. umoci and
# skopeo: images built and pushed without a container engine. make and gcc:
# jemalloc, the controller's allocator, is built from its C sources.
for p in make gcc etcd-server pkg-config libssl-dev libssh2-1-dev openssl curl ca-certificates python3-venv docker-registry apache2-utils nginx-light fcgiwrap openssh-server git umoci skopeo; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
command -v kubectl >/dev/null 2>&1 || need_pkgs+=(kubernetes-client)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing Debian packages: ${need_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
# etcd-server starts a system etcd on :2379 on install, docker-registry a
# registry on :5000; tests run their own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
  $SUDO systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  $SUDO systemctl disable --now etcd >/dev/null 2>&1 || true
fi

if [ -x "$K8S_BIN/kube-apiserver" ] && [ -x "$K8S_BIN/kube-controller-manager" ]; then
  log "kube-apiserver v1.20.2 cached in $K8S_BIN"
else
  log "building kube-apiserver and kube-controller-manager v1.20.2 from Debian source (~7 min, once)"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq golang-go rsync golang-github-modern-go-reflect2-dev dpkg-dev >/dev/null
  work=$CACHE/k8s-build
  rm -rf "$work" && mkdir -p "$work/lists/partial" "$work/src"
  # A private deb-src list that repeats the machine's configured mirror.
  : >"$work/sources.list"
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    grep -E '^deb ' "$f" | sed 's/^deb /deb-src /' >>"$work/sources.list" || true
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk '/^URIs:/{u=$2} /^Suites:/{s=""; for(i=2;i<=NF;i++) s=s" "$i} /^Components:/{c=""; for(i=2;i<=NF;i++) c=c" "$i}
         /^$/{if(u!=""){n=split(s,a," "); for(i=1;i<=n;i++) print "deb-src [trusted=yes] " u " " a[i] c}; u=""}
         END{if(u!=""){n=split(s,a," "); for(i=1;i<=n;i++) print "deb-src [trusted=yes] " u " " a[i] c}}' "$f" >>"$work/sources.list"
  done
  aptopts=(-o Dir::Etc::sourcelist="$work/sources.list" -o Dir::Etc::sourceparts=- -o Dir::State::Lists="$work/lists" -o APT::Get::List-Cleanup=0)
  apt-get "${aptopts[@]}" update -qq
  (cd "$work/src" && apt-get "${aptopts[@]}" source --download-only kubernetes >/dev/null)
  orig=$(ls "$work"/src/kubernetes_*.orig.tar.gz | head -n1)
  mkdir -p "$work/tree" && tar -xzf "$orig" -C "$work/tree" --strip-components=1
  cd "$work/tree"
  rm -rf vendor/github.com/modern-go/reflect2
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
  rm -f vendor/github.com/modern-go/reflect2/go.mod
  mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
  export GOPATH=$PWD/.go CGO_ENABLED=0 GOPROXY=off GOFLAGS=-mod=vendor
  rm -rf _output
  make WHAT=cmd/kube-apiserver >"$work/build.log" 2>&1 || { tail -50 "$work/build.log"; exit 1; }
  make WHAT=cmd/kube-controller-manager >>"$work/build.log" 2>&1 || { tail -50 "$work/build.log"; exit 1; }
  mkdir -p "$K8S_BIN"
  cp _output/bin/kube-apiserver _output/bin/kube-controller-manager "$K8S_BIN/"
  cd / && rm -rf "$work"
  log "built $K8S_BIN/kube-apiserver"
fi
# Helm: the official Helm v4 Go SDK, from PyPI (helm-python-sdk), used by
# scripts/helm.py; no helm binary is needed.
HELM_VENV=$CACHE/helm-venv
if ! "$HELM_VENV/bin/python" -c 'import helm_python' >/dev/null 2>&1; then
  log "installing the Helm SDK (helm-python-sdk) into $HELM_VENV"
  rm -rf "$HELM_VENV"
  python3 -m venv "$HELM_VENV"
  "$HELM_VENV/bin/pip" install -q --disable-pip-version-check 'helm-python-sdk==0.2.2'
fi
log "ready: kube-apiserver in $K8S_BIN, Helm SDK in $HELM_VENV"
