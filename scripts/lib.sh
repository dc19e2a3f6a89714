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

# assets_ready: the chat page's browser libraries, pinned by package-lock.json, copied into
# static/vendor (served by the app itself: no CDN). Re-done when the lockfile changes.
assets_ready() {
  local stamp
  apt_need node:nodejs npm:npm
  stamp=$(sha256sum package-lock.json | cut -c1-16)
  if [ "$(cat static/vendor/.installed 2>/dev/null)" = "$stamp" ]; then
    echo "up to date"
    return
  fi
  echo "npm ci (package-lock.json)"
  npm ci --no-audit --no-fund --loglevel=error >/dev/null
  rm -rf static/vendor && mkdir -p static/vendor/fonts
  cp node_modules/marked/lib/marked.umd.js static/vendor/marked.js
  cp node_modules/dompurify/dist/purify.min.js static/vendor/purify.js
  cp node_modules/katex/dist/katex.min.js static/vendor/katex.js
  cp node_modules/katex/dist/katex.min.css static/vendor/katex.css
  cp node_modules/katex/dist/fonts/*.woff2 static/vendor/fonts/
  cp node_modules/@highlightjs/cdn-assets/highlight.min.js static/vendor/highlight.js
  cp node_modules/@highlightjs/cdn-assets/styles/github.min.css static/vendor/hl-light.css
  cp node_modules/@highlightjs/cdn-assets/styles/github-dark.min.css static/vendor/hl-dark.css
  echo "$stamp" > static/vendor/.installed
  echo "copied into static/vendor"
}

# oidc_provider_ready: the OpenID Connect provider the browser tests sign in with (the npm
# package oidc-provider, OpenID Certified), pinned by tests/support/oidc/package-lock.json.
oidc_provider_ready() {
  local dir=tests/support/oidc stamp
  stamp=$(sha256sum "$dir/package-lock.json" | cut -c1-16)
  if [ "$(cat "$dir/node_modules/.installed" 2>/dev/null)" = "$stamp" ]; then
    echo "oidc-provider up to date"
    return
  fi
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  echo "$stamp" > "$dir/node_modules/.installed"
  echo "oidc-provider installed"
}
