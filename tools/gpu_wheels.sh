#!/usr/bin/env bash
# The wheels a lent GPU machine needs beside its own packages, fetched here into .whl/ (git-ignored), for the
# device tool's carry [".whl"]; tools/gpu_check.sh installs them to /tmp/site there, ahead of the image's.
# Its image is older than the project needs (seen: transformers 5.17 and huggingface_hub 1.33, where
# pyproject asks for transformers >= 5.24), and it reaches no registry. So: transformers as installed here,
# with everything it depends on at the versions installed here (numpy and torch excepted: the image's are
# built for its Python and CUDA), for CPython 3.12 on x86_64 Linux, as that machine runs.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t wheels < <(python3 - <<'EOF'
import re
from importlib.metadata import PackageNotFoundError, requires, version

found, todo = {}, ["transformers"]
while todo:
    name = todo.pop()
    if name in found or name in ("numpy", "torch"):
        continue
    try:
        found[name] = version(name)
    except PackageNotFoundError:  # an optional platform's dependency (colorama on Windows, say)
        continue
    todo += [re.split(r"[<>=!;\[ ~]", r)[0].lower().replace("_", "-") for r in requires(name) or []
             if "extra ==" not in r]
print("\n".join(f"{name}=={v}" for name, v in sorted(found.items())))
EOF
)
rm -rf .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${wheels[@]}"
du -sh .whl
echo "${#wheels[@]} wheels in .whl/ for the device tool: run tools/gpu_check.sh \"\$OUT\" with carry [\".whl\"]"
