# Shared helpers for scripts/run.sh and scripts/test.sh (sourced, not run).

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

apt_updated=0
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "missing Debian packages: $*; run as root or: sudo apt-get install -y --no-install-recommends $*" >&2
    exit 1
  fi
  if [ "$apt_updated" = 0 ]; then
    echo "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
  echo "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# apt_need command:package ...  installs the packages whose command is missing.
apt_need() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    apt_install $(printf '%s\n' "${missing[@]}" | sort -u)
  else
    echo "already installed"
  fi
}

# venv_ready REQUIREMENTS_FILE: .venv with exactly these pins, reinstalled when they change.
venv_ready() {
  local req=$1 py stamp
  py=$(command -v python3.11 || command -v python3.12 || command -v python3)
  if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $($py --version)"
    "$py" -m venv .venv
  fi
  stamp=$(cat requirements*.txt | sha256sum | cut -c1-16)-$req
  if [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
    echo "pip install -r $req"
    .venv/bin/pip install -q --disable-pip-version-check -r "$req"
    echo "$stamp" > .venv/.installed
  else
    echo "up to date"
  fi
}
