# Shared set-up for scripts/test, scripts/demo and scripts/bench; source it, do not run it.
# On a fresh Debian machine (as root) it installs what is missing: mosquitto from Debian,
# python3-venv, then this package with its test extras into .venv.
set -euo pipefail

_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_apt_updated=0

_apt_install() {
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: need $* but cannot install it (not root, or no apt-get); install it and retry" >&2
    exit 1
  fi
  if [ "$_apt_updated" -eq 0 ]; then
    echo "==> apt-get update" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    _apt_updated=1
  fi
  echo "==> apt-get install -y $*" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  _apt_install mosquitto mosquitto-clients
fi
# The clock-skew tests run nodes under libfaketime (Debian's faketime package).
if ! command -v faketime >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  _apt_install faketime
fi
# Debian puts the broker in /usr/sbin, which a non-login shell may not have on PATH.
case ":$PATH:" in *:/usr/sbin:*) ;; *) export PATH="$PATH:/usr/sbin" ;; esac

PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  _apt_install python3 python3-venv
fi
VENV="$_root/.venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV" >&2
  if ! "$PYTHON" -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    _apt_install python3-venv
    "$PYTHON" -m venv "$VENV"
  fi
fi
# Re-install only when the package metadata changed since the last install.
_stamp="$VENV/.edge-agent-installed"
if [ ! -f "$_stamp" ] || [ "$_root/setup.cfg" -nt "$_stamp" ] || [ "$_root/setup.py" -nt "$_stamp" ]; then
  echo "==> pip install -e .[test]   (log: $VENV/pip-install.log)" >&2
  if ! { "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
         "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$_root[test]"; } \
       >"$VENV/pip-install.log" 2>&1; then
    tail -n 40 "$VENV/pip-install.log" >&2
    echo "error: pip install failed; full log in $VENV/pip-install.log" >&2
    exit 1
  fi
  touch "$_stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$_root"
