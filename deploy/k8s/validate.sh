#!/usr/bin/env bash
# Renders every overlay with kustomize (kubectl kustomize) and validates each object offline
# against the Kubernetes API schemas (kubernetes-validate --strict: unknown fields are errors),
# then checks what the deployment promises: two coordinator replicas with gRPC probes, a GPU per
# worker, non-root containers that cannot escalate, Secrets for the URL and tokens, a
# termination grace period for workers to hand their seeds back. Works on a copy: secrets are
# generated there, never in the checkout.
#
#   deploy/k8s/validate.sh [--install]   (--install: kubectl via apt-get when missing, as root;
#                                         kubernetes-validate via pip into the per-user cache)
#
#   KUBERNETES_VERSION   the API version to validate against (default 1.30.0)
set -euo pipefail
cd "$(dirname "$0")"
k8s=${KUBERNETES_VERSION:-1.30.0}
cache=${SEEDSWEEP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/seedsweep}
kv_version=1.37.0
kv=$cache/kubernetes-validate-$kv_version

if ! command -v kubectl >/dev/null; then
  if [ "${1:-}" = --install ] && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl >&2
  else
    echo "error: kubectl not found (it renders the kustomizations): install it, or run with --install as root" >&2; exit 1
  fi
fi
if [ ! -f "$kv/.complete" ]; then
  [ "${1:-}" = --install ] || { echo "error: kubernetes-validate is not in $kv: run with --install" >&2; exit 1; }
  rm -rf "$kv.tmp"
  python3 -m pip install --quiet --root-user-action=ignore --disable-pip-version-check --no-input --target "$kv.tmp" \
    "kubernetes-validate==$kv_version" >&2
  touch "$kv.tmp/.complete"
  rm -rf "$kv"; mv "$kv.tmp" "$kv"
fi
export PYTHONPATH=$kv

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r . "$work/k8s"
rm -rf "$work"/k8s/overlays/*/secrets
for overlay in "$work"/k8s/overlays/*/; do
  name=$(basename "$overlay")
  "$work/k8s/make-secrets.sh" "$name" postgres://seedsweep:pw@db.example:5432/seedsweep 2>/dev/null
  kubectl kustomize "$overlay" >"$work/$name.yaml"
  python3 - "$work/$name.yaml" "$work/$name" <<'PY'
import sys, yaml, os
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
os.makedirs(sys.argv[2])
for i, d in enumerate(docs):
    with open(f"{sys.argv[2]}/{i:02d}-{d['kind']}-{d['metadata']['name']}.yaml", "w") as f:
        yaml.safe_dump(d, f)
PY
  python3 -m kubernetes_validate --strict --quiet -k "$k8s" "$work/$name"/*.yaml \
    || { echo "FAIL: overlay $name does not validate against Kubernetes $k8s" >&2; exit 1; }
  python3 - "$work/$name.yaml" "$name" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
name = sys.argv[2]
by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
problems = []
def need(cond, what):
    if not cond:
        problems.append(what)
coord = by.get(("Deployment", "seedsweep-coordinator"))
workers = by.get(("Deployment", "seedsweep-worker"))
need(coord and workers and ("Job", "seedsweep-migrate") in by, "coordinator, workers and migration Job present")
need(("Service", "seedsweep-coordinator") in by, "a Service for the coordinator")
secrets = [d for d in docs if d["kind"] == "Secret"]
need(len(secrets) == 1 and {"database-url", "worker-token", "admin-token"} <= set(secrets[0]["data"]), "one Secret with the database URL and both tokens")
if coord:
    need(coord["spec"]["replicas"] == 2, "two coordinator replicas")
    c = coord["spec"]["template"]["spec"]["containers"][0]
    need("grpc" in c.get("readinessProbe", {}) and "grpc" in c.get("livenessProbe", {}), "gRPC health probes on the coordinator")
    need(not any(a.startswith("--insecure") for a in c["args"]), "the coordinator runs with tokens, not --insecure")
if workers:
    spec = workers["spec"]["template"]["spec"]
    c = spec["containers"][0]
    need(c["resources"]["limits"].get("nvidia.com/gpu") == 1, "one GPU per worker")
    need(spec.get("terminationGracePeriodSeconds", 30) >= 60, "workers get time to hand their seeds back")
if name == "small":
    need(("StatefulSet", "seedsweep-postgres") in by, "PostgreSQL as a StatefulSet in the small overlay")
for d in docs:
    tmpl = d.get("spec", {}).get("template", {}).get("spec")
    if not tmpl:
        continue
    pod = tmpl.get("securityContext", {})
    for c in tmpl["containers"]:
        sc = c.get("securityContext", {})
        where = f'{d["kind"]}/{d["metadata"]["name"]}/{c["name"]}'
        need(pod.get("runAsNonRoot") or sc.get("runAsNonRoot"), f"{where} runs as non-root")
        need(sc.get("allowPrivilegeEscalation") is False, f"{where} cannot escalate privileges")
        need("requests" in c.get("resources", {}), f"{where} has resource requests")
if problems:
    sys.exit(f"FAIL: overlay {name}: " + "; ".join(problems))
print(f"ok: overlay {name}: {len(docs)} objects valid", flush=True)
PY
done
