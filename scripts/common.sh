# Shared by scripts/run and scripts/test: root or sudo, apt only when needed, the venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IMAG_VENV:-$ROOT/.venv}"
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

APT_UPDATED=""
apt_install() {
    # Install the Debian packages among "$@" that are not installed yet.
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "==> installing Debian packages: ${missing[*]}" >&2
    if [ -z "$APT_UPDATED" ]; then $SUDO apt-get update -qq </dev/null; APT_UPDATED=1; fi
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
}

make_venv() {
    # $1: pip extras spec, e.g. "." or ".[test]"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating virtual environment $VENV" >&2
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip </dev/null
    echo "==> installing IMAG and its Python dependencies" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT$1" </dev/null
}
