#!/usr/bin/env bash
# Validate the Kubernetes manifests offline: render the Kustomize base, then check every
# object against the Kubernetes OpenAPI schemas with kubernetes-validate (PyPI; it ships
# the schemas, so no cluster and no network are needed once it is installed), strictly:
# an unknown field is an error.
#
# Usage: deploy/k8s/validate.sh [KUSTOMIZE_DIR]      (default deploy/k8s/base)
#
# Rendering: `kubectl kustomize` when kubectl is installed; otherwise a small renderer
# (resources + configMapGenerator + images, the only features the base uses).
# kubernetes-validate is installed on first use into a virtualenv under
# ${CARGO_TARGET_DIR:-target}/kubernetes-validate-venv (IOTGW_K8S_VALIDATE_VENV overrides).
#
# Environment:
#   IOTGW_K8S_VERSIONS   Kubernetes versions to validate against (default "1.29.0 1.37.0")
#
# Exit: 0 valid, 1 invalid, 3 the validator could not be installed (no PyPI access).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="${1:-$ROOT/deploy/k8s/base}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
VENV="${IOTGW_K8S_VALIDATE_VENV:-$TARGET/kubernetes-validate-venv}"
VALIDATOR_VERSION="1.37.0"
VERSIONS="${IOTGW_K8S_VERSIONS:-1.29.0 1.37.0}"
log() { printf '[k8s-validate] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/kubernetes-validate" ]; then
    log "installing kubernetes-validate==$VALIDATOR_VERSION into $VENV"
    mkdir -p "$(dirname "$VENV")"
    if ! { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q --disable-pip-version-check \
            "kubernetes-validate==$VALIDATOR_VERSION"; } >&2; then
        log "cannot install kubernetes-validate (is PyPI reachable? is python3-venv installed?)"
        exit 3
    fi
fi

OUT="$(mktemp "${TMPDIR:-/tmp}/iotgw-k8s.XXXXXX.yaml")"
trap 'rm -f "$OUT"' EXIT

if command -v kubectl >/dev/null 2>&1 && kubectl kustomize "$DIR" >"$OUT" 2>/dev/null; then
    log "rendered $DIR with kubectl kustomize"
else
    log "rendering $DIR with the built-in renderer (no kubectl)"
    "$VENV/bin/python" - "$DIR" >"$OUT" <<'EOF'
import os, sys, yaml

base = sys.argv[1]
with open(os.path.join(base, "kustomization.yaml"), encoding="utf-8") as f:
    k = yaml.safe_load(f)
known = {"apiVersion", "kind", "labels", "resources", "configMapGenerator", "images"}
unknown = set(k) - known
if unknown:
    sys.exit(f"kustomization.yaml uses {sorted(unknown)}: install kubectl to render it")
docs = []
for res in k.get("resources", []):
    with open(os.path.join(base, res), encoding="utf-8") as f:
        docs += [d for d in yaml.safe_load_all(f) if d]
for gen in k.get("configMapGenerator", []):
    data = {}
    for entry in gen.get("files", []):
        key, _, path = entry.partition("=") if "=" in entry else (os.path.basename(entry), "", entry)
        with open(os.path.join(base, path), encoding="utf-8") as f:
            data[key] = f.read()
    docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
images = {i["name"]: i for i in k.get("images", [])}
for d in docs:
    spec = d.get("spec", {}).get("template", {}).get("spec", {})
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        img = images.get(c.get("image"))
        if img:
            c["image"] = f'{img.get("newName", img["name"])}:{img.get("newTag", "latest")}'
yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
EOF
fi

status=0
for v in $VERSIONS; do
    if "$VENV/bin/kubernetes-validate" --strict --quiet -k "$v" "$OUT"; then
        log "valid against Kubernetes $v ($(grep -c '^kind:' "$OUT") objects)"
    else
        log "INVALID against Kubernetes $v"
        status=1
    fi
done
exit "$status"
