#!/usr/bin/env bash
# Build the operator and activator images with buildah, offline inside the build:
# a wheelhouse of Ember's dependencies is made on this machine first (pip wheel, with this
# machine's package index and certificates) and the Dockerfiles install only from it.
#
#   charts/build-images.sh [operator|activator]...   (default: both)
#   env: BASE_IMAGE (default localhost/ember-base:bookworm), REGISTRY (localhost), TAG (dev),
#        PYTHON (python3; must match the image's Python minor version, 3.11 on Debian bookworm),
#        BUILDAH_ARGS (extra arguments, e.g. --root/--runroot for a separate storage)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BASE_IMAGE="${BASE_IMAGE:-localhost/ember-base:bookworm}"
REGISTRY="${REGISTRY:-localhost}"
TAG="${TAG:-dev}"
PYTHON="${PYTHON:-python3}"
COMPONENTS=("$@")
[[ ${#COMPONENTS[@]} -gt 0 ]] || COMPONENTS=(operator activator)

CONTEXT="$(mktemp -d "${TMPDIR:-/tmp}/ember-image-context.XXXXXX")"
trap 'rm -rf "$CONTEXT"' EXIT
cp "$ROOT/pyproject.toml" "$ROOT"/Dockerfile.* "$CONTEXT/"
mkdir -p "$CONTEXT/operator"
cp -r "$ROOT/operator/ember" "$CONTEXT/operator/ember"
find "$CONTEXT/operator" -name __pycache__ -prune -exec rm -rf {} +
"$PYTHON" -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
  "$ROOT/pyproject.toml" > "$CONTEXT/requirements.txt"
"$PYTHON" -m pip wheel --quiet --wheel-dir "$CONTEXT/wheels" -r "$CONTEXT/requirements.txt" >&2

for component in "${COMPONENTS[@]}"; do
  image="$REGISTRY/ember-$component:$TAG"
  # shellcheck disable=SC2086
  buildah ${BUILDAH_ARGS:-} bud --isolation chroot --pull-never --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    -f "$CONTEXT/Dockerfile.$component" -t "$image" "$CONTEXT" >&2
  echo "$image"
done
