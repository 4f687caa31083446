#!/usr/bin/env bash
# Run the demo: bash scripts/demo.sh [args...]  (same as `idempotent demo ...`)
set -euo pipefail
# shellcheck source=scripts/_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec .venv/bin/idempotent demo "$@"
