#!/usr/bin/env bash
# Run HERE (a machine with network), once, before bench/gpu.sh runs on the GPU machine.
#
# The GPU machine's image has python3 (3.12) with torch, numpy, httpx, uvloop, matplotlib,
# safetensors, prometheus-client and tqdm, but not the rest of flowserve's stack, no wrk, and no
# network. This fetches what is missing: wheels for CPython 3.12 at the versions of this .venv into
# .whl/, and Debian's wrk with its LuaJIT library into .deb/. Both folders are git-ignored (through
# .git/info/exclude) and travel with the working tree when the run names them in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}

for d in /.whl/ /.deb/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude
done
mkdir -p .whl .deb
rm -f .whl/*.whl .deb/*.deb

# flowserve's runtime needs that the image lacks (and the versions this .venv runs)
PACKAGES="zuko fastapi starlette uvicorn pydantic pydantic_core pydantic-settings python-dotenv orjson httptools
annotated-types annotated-doc typing-inspection typing_extensions opentelemetry-api"
SPECS=$($PY - $PACKAGES <<'PYEOF'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PYEOF
)
echo "wheels: $SPECS"
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $SPECS

# wrk and its LuaJIT, unpacked there with dpkg -x (never installed into /)
(cd .deb && apt-get download wrk libluajit-5.1-2 >/dev/null 2>&1)
ls -la .whl .deb
du -sh .whl .deb
