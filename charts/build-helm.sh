#!/usr/bin/env bash
# Build a real helm binary from the Go module proxy into ~/.cache/ember/helm-<version>/helm.
# Idempotent: exits at once when the binary is already there. Prints the binary's path.
set -euo pipefail
HELM_VERSION="${HELM_VERSION:-v3.19.0}"
DEST="${EMBER_CACHE:-$HOME/.cache/ember}/helm-${HELM_VERSION}"
if [[ -x "$DEST/helm" ]]; then
  echo "$DEST/helm"
  exit 0
fi
command -v go >/dev/null || { echo "build-helm.sh: go is required (apt-get install golang or /usr/local/go)" >&2; exit 1; }
mkdir -p "$DEST"
# -p 1 keeps one compile job: the machine is shared with other builds.
GOFLAGS="${GOFLAGS:--p=1}" CGO_ENABLED=0 GOBIN="$DEST.tmp" \
  go install -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}" \
  "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}" >&2
mv "$DEST.tmp/helm" "$DEST/helm"
rmdir "$DEST.tmp"
"$DEST/helm" version --short >&2
echo "$DEST/helm"
