#!/usr/bin/env bash
# Installs smartbin as a systemd service on Raspberry Pi OS (Bookworm or later), or removes it.
#
#   sudo systemd/install.sh              install or upgrade (idempotent), enable, start; the
#                                        web dashboard's unit is installed, not enabled
#   sudo systemd/install.sh --uninstall  stop, disable, remove the program (keeps config
#                                        and counts; add --purge to remove those and the user)
#
# The program is built into a wheel and installed (not editable) into /opt/smartbin/venv, so
# the service needs no source tree at run time. Options for packagers and tests: --root DIR
# (install below DIR), --no-apt, --no-systemctl, --no-user, --no-venv (skip the program);
# $PYTHON picks the interpreter for the venv (default python3).
set -euo pipefail

ROOT="" APT=1 SYSTEMCTL=1 MKUSER=1 VENV=1 ACTION=install PURGE=0
PYTHON=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --uninstall) ACTION=uninstall ;;
    --purge) PURGE=1 ;;
    --root) ROOT=$2; shift ;;
    --no-apt) APT=0 ;;
    --no-systemctl) SYSTEMCTL=0 ;;
    --no-user) MKUSER=0 ;;
    --no-venv) VENV=0 ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX="$ROOT/opt/smartbin"
ETC="$ROOT/etc/smartbin"
UNIT="$ROOT/etc/systemd/system/smartbin.service"
DASHBOARD_UNIT="$ROOT/etc/systemd/system/smartbin-dashboard.service"
STATE="$ROOT/var/lib/smartbin"
OWNER=root GROUP=smartbin
if [ "$MKUSER" = 0 ]; then OWNER=$(id -un) GROUP=$(id -gn); fi
if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo), or with --root DIR" >&2; exit 1
fi
say() { printf 'smartbin: %s\n' "$*"; }
ctl() { if [ "$SYSTEMCTL" = 1 ]; then systemctl "$@"; fi; }

if [ "$ACTION" = uninstall ]; then
  ctl disable --now smartbin.service smartbin-dashboard.service 2>/dev/null || true
  rm -f "$UNIT" "$DASHBOARD_UNIT"
  ctl daemon-reload
  rm -rf "$PREFIX"
  if [ "$PURGE" = 1 ]; then
    rm -rf "$ETC" "$STATE" "$ROOT/var/cache/smartbin" "$ROOT/var/lib/smartbin-dashboard"
    if [ "$MKUSER" = 1 ] && id smartbin >/dev/null 2>&1; then userdel smartbin; fi
    say "removed, with configuration, counts and user"
  else
    say "removed; configuration in $ETC and counts in $STATE are kept (--purge removes them)"
  fi
  exit 0
fi

if [ "$APT" = 1 ] && command -v apt-get >/dev/null; then
  # picamera2 and libcamera only come from Pi OS; lgpio is gpiozero's pin library there.
  apt-get install -y -qq python3-venv python3-picamera2 python3-lgpio >/dev/null
fi
if [ "$MKUSER" = 1 ]; then
  id smartbin >/dev/null 2>&1 || useradd --system --home-dir /var/lib/smartbin \
    --shell /usr/sbin/nologin smartbin
  for g in gpio video i2c; do
    getent group "$g" >/dev/null && usermod -aG "$g" smartbin
  done
fi

install -d -m 0755 "$PREFIX"
cp "$SRC/README.md" "$PREFIX/README.md"
# Earlier versions ran from a copy of the source tree here; the wheel replaces it.
rm -rf "$PREFIX/src"

if [ "$VENV" = 1 ]; then
  # --system-site-packages: picamera2 and libcamera from Pi OS are visible in the venv.
  [ -x "$PREFIX/venv/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$PREFIX/venv"
  BUILD=$(mktemp -d)
  trap 'rm -rf "$BUILD"' EXIT
  # Built from a clean copy: setuptools writes build/ and *.egg-info beside the sources,
  # which would leave root-owned files in the clone and can carry stale files into the wheel.
  mkdir "$BUILD/src"
  (cd "$SRC" && tar --exclude=.git --exclude='.venv*' --exclude=__pycache__ --exclude=./build \
     --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache --exclude=./out \
     --exclude=head_float.npz -cf - .) | tar -C "$BUILD/src" -xf -
  "$PREFIX/venv/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps \
    -w "$BUILD/dist" "$BUILD/src"
  WHEEL=$(echo "$BUILD"/dist/smartbin-*.whl)
  # An upgrade may keep the version number: force the program's files in, then let pip add
  # whatever dependencies the new version needs.
  "$PREFIX/venv/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall \
    --no-deps "$WHEEL"
  "$PREFIX/venv/bin/python" -m pip install -q --disable-pip-version-check "$WHEEL[pi]"
  say "installed $(basename "$WHEEL") into $PREFIX/venv"
fi

install -d -m 0750 -o "$OWNER" -g "$GROUP" "$ETC"
if [ ! -f "$ETC/config.toml" ]; then
  install -m 0640 -o "$OWNER" -g "$GROUP" "$SRC/systemd/config.example.toml" "$ETC/config.toml"
  say "wrote $ETC/config.toml (all defaults, commented): edit it, then 'smartbin check'"
else
  say "kept $ETC/config.toml"
fi
# systemd hands the password to the service as a credential; empty means none.
[ -f "$ETC/mqtt_password" ] || install -m 0600 -o "$OWNER" -g "$(id -gn "$OWNER")" /dev/null \
  "$ETC/mqtt_password"
# The dashboard's login password, also a credential: a random one on first install (the
# dashboard refuses an empty file); the owner may write their own into it.
if [ ! -f "$ETC/dashboard_password" ]; then
  install -m 0600 -o "$OWNER" -g "$(id -gn "$OWNER")" /dev/null "$ETC/dashboard_password"
  "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(12))' > "$ETC/dashboard_password"
  say "wrote a random dashboard password into $ETC/dashboard_password"
fi
install -d -m 0755 "$(dirname "$UNIT")"
install -m 0644 "$SRC/systemd/smartbin.service" "$UNIT"
# The dashboard is optional (it may run on a laptop or a server instead): installed, not
# enabled; an upgrade restarts it only when it runs.
install -m 0644 "$SRC/systemd/smartbin-dashboard.service" "$DASHBOARD_UNIT"
ctl daemon-reload
ctl enable --now smartbin.service
ctl restart smartbin.service
ctl try-restart smartbin-dashboard.service
say "installed; 'systemctl status smartbin' and 'journalctl -u smartbin -f' show it working"
say "web dashboard (not enabled): 'sudo systemctl enable --now smartbin-dashboard' serves"
say "  it on http://127.0.0.1:8080/; the password is in $ETC/dashboard_password"
