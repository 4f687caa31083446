# shellcheck shell=bash
# Sourced by scripts/test.sh and scripts/demo.sh: cd to the repo root and make
# sure .venv exists with the package installed in editable mode (".[dev]").
# Reinstalls when pyproject.toml is newer than .venv/.installed-stamp.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

_idem_stamp=".venv/.installed-stamp"
_idem_need_install=0

if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv" >&2
    if ! python3 -m venv .venv 2>/dev/null; then
        # Debian ships ensurepip separately (python3-venv).
        rm -rf .venv
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "==> installing python3-venv" >&2
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            python3 -m venv .venv
        else
            echo "error: 'python3 -m venv' failed; install python3-venv" >&2
            exit 1
        fi
    fi
    _idem_need_install=1
elif [ ! -f "$_idem_stamp" ] || [ pyproject.toml -nt "$_idem_stamp" ]; then
    _idem_need_install=1
fi

if [ "$_idem_need_install" = 1 ]; then
    echo "==> pip install -e '.[dev]'" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
    touch "$_idem_stamp"
fi

unset _idem_stamp _idem_need_install
