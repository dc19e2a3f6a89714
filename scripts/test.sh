#!/usr/bin/env bash
# The test command. On a fresh Debian machine it installs what the tests need (Debian
# packages for Slurm and munge, a Python venv with pinned packages) and runs the whole
# suite against real components it starts itself. Needs root (creates the functional
# account, runs slurmctld/slurmd). Extra arguments go to pytest.
#
# scripts/test.sh --fast: the fast tier, for a developer without root. Only the venv is set up;
# runs every test that needs none of Slurm, sshd, a browser, vLLM, PostgreSQL, Redis, a live
# daphne, nginx or root (the markers in pyproject.toml). CI runs the full command.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

if [ "${1:-}" = "--fast" ]; then
  shift
  step "python environment"
  venv_ready requirements-dev.txt
  step "fast tests (no root, Slurm, sshd, browser, vLLM, PostgreSQL, Redis, daphne or nginx)"
  # Two workers, one test file each at a time (most of these tests wait on processes, not the CPU).
  exec .venv/bin/python -m pytest -q -n 2 --dist loadfile \
    -m "not (slurm or sshd or browser or vllm or postgres or redis or live or root or nginx)" "$@"
fi

step "system packages"
# slurmdbd (with its MySQL plugin) and the MariaDB client: the charge-back tests keep Slurm accounts
# in the machine's running MariaDB (tests/harness/slurm.py, accounting=True).
apt_need slurmctld:slurm-wlm slurmd:slurm-wlm sbatch:slurm-client munged:munge \
  slurmdbd:slurmdbd mariadb:mariadb-client \
  /usr/sbin/sshd:openssh-server ssh:openssh-client ssh-keygen:openssh-client \
  chromium:chromium node:nodejs npm:npm nginx:nginx-light prometheus:prometheus
[ -x /usr/bin/python3 ] || apt_install python3

step "python environment"
venv_ready requirements-dev.txt

step "browser libraries (npm, package-lock.json) and the test OIDC provider"
assets_ready
oidc_provider_ready

step "model runtime for the end-to-end test: vLLM for CPU and SmolLM2 (cached after the first run)"
vllm_ready
smollm2_ready
# tests/test_e2e_vllm.py runs them in a Slurm job as the functional account; here they must exist.
export CHATAI_VLLM_PYTHON="$VLLM_ENV/bin/python" CHATAI_MODEL_DIR="$SMOLLM2_DIR" CHATAI_REQUIRE_VLLM=1

step "lint (ruff) and types (mypy on hpcside)"
.venv/bin/ruff check .
.venv/bin/mypy --no-error-summary

step "tests"
exec .venv/bin/python -m pytest "$@"
