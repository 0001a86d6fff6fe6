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

stop_service() {
    # Stop a service a Debian package started at install, and keep it from
    # starting at boot (systemd, or the init script where systemd is absent).
    if [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now "$1" >/dev/null 2>&1 || true
    else
        $SUDO service "$1" stop >/dev/null 2>&1 || true
        $SUDO update-rc.d "$1" disable >/dev/null 2>&1 || true
    fi
}

make_venv() {
    # $1: pip extras spec, e.g. "" or "[test]".
    # pip runs only when pyproject.toml changed since the last install into this
    # venv (or the extras asked for were not installed): a restart of an
    # installed archive starts offline and quietly.  The (editable) package
    # itself follows the source without reinstalling.
    local stamp="$VENV/.imag-installed" want
    want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1) $1"
    if [ -x "$VENV/bin/imag" ] && [ -f "$stamp" ] \
        && { grep -qxF -- "$want" "$stamp" || { [ -z "$1" ] && grep -q "^${want% } " "$stamp"; }; }
    then
        return 0
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating virtual environment $VENV" >&2
        python3 -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip </dev/null
    fi
    echo "==> installing IMAG and its Python dependencies" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT$1" </dev/null
    # a new pyproject.toml makes the stamps of the old one stale: keep this one
    { grep -q "^${want%% *} " "$stamp" 2>/dev/null && cat "$stamp"; echo "$want"; } \
        | sort -u >"$stamp.tmp" && mv "$stamp.tmp" "$stamp"
}

OHIF_VERSION="${IMAG_OHIF_VERSION:-3.13.2}"  # pinned: tests/test_ohif.py is written against it
OHIF_DIR="$ROOT/.cache/ohif/$OHIF_VERSION"
install_ohif() {
    # The OHIF Viewer as published (@ohif/app from the npm registry; its dist/
    # unchanged) in $OHIF_DIR/dist, for viewer.ohif_dir and tests/test_ohif.py.
    # Only the package's own tarball (npm checks its integrity), none of its
    # dependencies: dist/ is the built viewer.  A second run needs no network.
    [ -f "$OHIF_DIR/dist/index.html" ] && return 0
    command -v npm >/dev/null || apt_install npm
    echo "==> fetching the OHIF Viewer $OHIF_VERSION (@ohif/app, npm registry)" >&2
    mkdir -p "$ROOT/.cache/ohif"
    local tmp
    tmp="$(mktemp -d "$ROOT/.cache/ohif/.fetch.XXXXXX")"
    (cd "$tmp" && npm pack --silent --cache "$tmp/npm" "@ohif/app@$OHIF_VERSION" >/dev/null \
        && tar -xzf "ohif-app-$OHIF_VERSION.tgz" package/dist package/package.json \
        && [ -f package/dist/index.html ]) </dev/null \
        || { rm -rf "$tmp"; echo "could not fetch @ohif/app@$OHIF_VERSION" >&2; return 1; }
    rm -rf "$OHIF_DIR" && mv "$tmp/package" "$OHIF_DIR" && rm -rf "$tmp"
}
