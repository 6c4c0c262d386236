#!/usr/bin/env bash
# Install everything the apiserver and cluster test tiers need from Debian (and Go from the Go module proxy
# when no recent Go is on PATH). Idempotent: installed packages are skipped, so a warm machine pays one
# dpkg query. The system services these packages ship (etcd, containerd) are not used: the tiers run
# their own instances on private ports, sockets and directories.
set -euo pipefail

PACKAGES=(
  etcd-server                                # etcd 3.4 under kube-apiserver
  containerd runc                            # the node's CRI runtime and OCI runtime
  containernetworking-plugins                # CNI bridge, host-local, loopback
  iptables conntrack ethtool socat iproute2  # what the kubelet and kube-proxy (iptables mode) expect
  ipset                                      # kube-router's network policy controller (per-policy sets)
  buildah debootstrap                        # images without Docker or a registry
  runsc                                      # Debian's gVisor (ptrace only), measured against the built one
  bubblewrap                                 # local mode's second sandbox, tested in the local tier
  redis-server                               # async invocations' store (Redis Streams), a real one per test
  nats-server                                # NATS JetStream event sources, a real one per test
  gcc libc6-dev                              # the pause binary is C (kubernetes build/pause)
  ca-certificates git curl unzip
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$pkg")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
fi

# kube-proxy's Service NAT between pods on one bridge needs bridged traffic to pass iptables (br_netfilter).
if [ ! -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then
  modprobe br_netfilter 2>/dev/null || echo "install-deps: warning: br_netfilter is not loaded and could not be" \
    "loaded; Services between pods will not work" >&2
fi

# Stop the machine-wide services if an init system started them (no-op without systemd).
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl disable --now etcd.service containerd.service >/dev/null 2>&1 || true
fi

# Go: Kubernetes 1.34 and the pinned gVisor need Go >= 1.26.3; Debian's golang-go (1.19) is too old. Without
# a recent enough `go` on PATH, install the official toolchain module from the Go module proxy.
GO_TOOLCHAIN=go1.26.8
go_ok() {
  command -v go >/dev/null 2>&1 || return 1
  local have
  have=$(go env GOVERSION 2>/dev/null | sed 's/^go//')
  [ "$(printf '%s\n1.26.3\n' "$have" | sort -V | head -1)" = "1.26.3" ]
}
if ! go_ok; then
  # Debian's old Go is only used to ask where its module proxy is; the toolchain comes from there.
  command -v go >/dev/null 2>&1 || apt-get install -y -qq --no-install-recommends golang-go >/dev/null
  proxy=$(go env GOPROXY | cut -d, -f1)
  tmp=$(mktemp -d)
  curl -fsSL -o "$tmp/go.zip" "$proxy/golang.org/toolchain/@v/v0.0.1-${GO_TOOLCHAIN}.linux-amd64.zip"
  unzip -q "$tmp/go.zip" -d "$tmp"
  rm -rf /usr/local/go
  mv "$tmp/golang.org/toolchain@v0.0.1-${GO_TOOLCHAIN}.linux-amd64" /usr/local/go
  chmod -R a+rX /usr/local/go
  chmod a+x /usr/local/go/bin/* /usr/local/go/pkg/tool/*/*
  ln -sf /usr/local/go/bin/go /usr/local/bin/go
  rm -rf "$tmp"
  echo "install-deps: installed $(go version)"
fi

echo "install-deps: ok (${#missing[@]} packages installed)"
