#!/usr/bin/env bash
# Print the path of a Python 3.10 interpreter: PATH first, then pyenv, then uv.
# Rasa 3.6 supports Python 3.8-3.10 only, so a newer default python3 must not be used.
set -u
is310() { "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 10) else 1)' >/dev/null 2>&1; }
for cand in python3.10 python3 python; do
    p="$(command -v "$cand" 2>/dev/null)" || continue
    if is310 "$p"; then echo "$p"; exit 0; fi
done
if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.10(\.|$)' | sort -V -r); do
        p="$(pyenv prefix "$v" 2>/dev/null)/bin/python3.10"
        if [ -x "$p" ] && is310 "$p"; then echo "$p"; exit 0; fi
    done
fi
if command -v uv >/dev/null 2>&1; then
    p="$(uv python find 3.10 2>/dev/null)" && is310 "$p" && { echo "$p"; exit 0; }
    uv python install 3.10 >/dev/null 2>&1 && p="$(uv python find 3.10 2>/dev/null)" && is310 "$p" && { echo "$p"; exit 0; }
fi
echo "error: no Python 3.10 interpreter found (looked on PATH, in pyenv, in uv)." >&2
echo "fix: install one, e.g. 'pyenv install 3.10.13' or 'uv python install 3.10', then re-run 'make setup'." >&2
exit 1
