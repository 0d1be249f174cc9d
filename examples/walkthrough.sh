#!/usr/bin/env bash
# A short walk through a rollout's life on SQLite, in a scratch directory.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cutover="${CUTOVER:-$here/../.venv/bin/cutover}"
work="${WORKDIR:-$(mktemp -d)}"
cp "$here/cutover.yaml" "$work/cutover.yaml"
cd "$work"
export CUTOVER_CONFIG="$work/cutover.yaml"

step() { printf '\n\033[1m$ cutover %s\033[0m\n' "$*"; "$cutover" "$@"; }
refused() { printf '\n\033[1m$ cutover %s\033[0m   (expected to be refused)\n' "$*"; if "$cutover" "$@"; then echo "expected a refusal" >&2; exit 1; fi; }

step --help
refused init
step init --skip-validation --reason "walkthrough: no models built, so no validation"
step status
refused advance
step advance --force --reason "walkthrough: no traffic yet, so no verdict"
step pause --reason "walkthrough"
refused advance --force --reason "paused rollouts do not move"
step resume
step rollback --reason "walkthrough: rehearse a rollback"
refused advance
refused retry
step retry --skip-validation --reason "walkthrough: still no models"
step status --json
step history
printf '\nwork directory: %s\n' "$work"
