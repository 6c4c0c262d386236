#!/usr/bin/env bash
# Install every Debian package the apiserver and cluster test tiers need. Idempotent: packages that are
# already installed are skipped, so a warm machine pays one dpkg query.
set -euo pipefail

PACKAGES=(
  etcd-server                  # etcd 3.4 for kube-apiserver
  containerd runc              # the node's container runtime (CRI) and OCI runtime
  containernetworking-plugins  # CNI bridge, host-local, loopback, portmap
  iptables conntrack ethtool socat iproute2  # kubelet / kube-proxy-free pod networking helpers
  buildah debootstrap          # images without Docker or a registry
  runsc                        # gVisor (Debian, ptrace only): fallback for the Go-built runsc
  golang-go                    # only if no newer Go is on PATH; see below
  gcc libc6-dev                 # the pause binary is C (kubernetes build/pause)
  ca-certificates git
)

if command -v go >/dev/null 2>&1; then
  # A Go toolchain already on PATH (e.g. /usr/local/go) wins; Debian's golang-go is too old for Kubernetes 1.34.
  PACKAGES=("${PACKAGES[@]/golang-go}")
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
  [ -z "$pkg" ] && continue
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
fi

# The packages ship services (etcd, containerd) for the whole machine; the test tier runs its own instances
# with private ports, sockets and state directories, so system-wide ones are not needed. Stop them if an
# init system started them (no-op without systemd).
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl disable --now etcd.service containerd.service >/dev/null 2>&1 || true
fi
echo "install-deps: ok (${#missing[@]} installed)"
