#!/bin/sh
# Install this edgelearn deploy package into ROOT (default /: the running system; or a mounted SD-card root).
# Safe to run twice (same package: no change); a newer package replaces the older one with one atomic rename.
# Into / (or with EDGELEARN_VENV=1) it also makes /opt/edgelearn/venv from the package's wheels, and upgrades it
# whenever a package brings different wheels.
set -eu
ROOT="${1:-/}"
HERE="$(cd "$(dirname "$0")" && pwd)"
ID="$(sed -n 's/.*"package_id": *"\([0-9a-f]*\)".*/\1/p' "$HERE/PACKAGE.json")"
[ -n "$ID" ] || { echo "install.sh: PACKAGE.json has no package_id" >&2; exit 1; }
BASE="$ROOT/opt/edgelearn"
UNITS="$ROOT/etc/systemd/system"
mkdir -p "$BASE/packages" "$UNITS/multi-user.target.wants" "$ROOT/var/lib/edgelearn"
OLD="$(readlink "$BASE/current" 2>/dev/null | sed 's#^packages/##' || true)"
if [ ! -d "$BASE/packages/$ID" ]; then
  rm -rf "$BASE/packages/.$ID.tmp"
  cp -R "$HERE" "$BASE/packages/.$ID.tmp"
  sync
  mv "$BASE/packages/.$ID.tmp" "$BASE/packages/$ID"
fi
# The agent runs as the system user edgelearn: it reads the package (world-readable), while device.env (the broker
# password) and tls/device.key stay root's, 0600: systemd reads them for it (EnvironmentFile, LoadCredential).
chmod -R go+rX "$BASE/packages/$ID"
find "$BASE/packages" -mindepth 2 -maxdepth 2 -name device.env -exec chmod 600 {} +
find "$BASE/packages" -mindepth 3 -maxdepth 3 -path '*/tls/device.key' -exec chmod 600 {} +
# The service user, declared for systemd-sysusers (which also makes it in a mounted root, --root); else useradd.
mkdir -p "$ROOT/usr/lib/sysusers.d" "$ROOT/etc"
printf 'u edgelearn - "edgelearn device agent" /var/lib/edgelearn /usr/sbin/nologin\n' \
  > "$ROOT/usr/lib/sysusers.d/edgelearn.conf"
if command -v systemd-sysusers >/dev/null 2>&1; then
  systemd-sysusers --root="$ROOT" edgelearn.conf
elif [ "$ROOT" = "/" ] && ! id edgelearn >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/edgelearn --shell /usr/sbin/nologin edgelearn
fi
ln -sfn "packages/$ID" "$BASE/.current.tmp"
mv -T "$BASE/.current.tmp" "$BASE/current"
cp "$BASE/packages/$ID/edgelearn-device.service" "$UNITS/.edgelearn-device.service.tmp"
mv "$UNITS/.edgelearn-device.service.tmp" "$UNITS/edgelearn-device.service"
ln -sfn ../edgelearn-device.service "$UNITS/multi-user.target.wants/edgelearn-device.service"
if [ -n "$OLD" ] && [ "$OLD" != "$ID" ]; then echo "$OLD" > "$BASE/previous"; fi
PREV="$(cat "$BASE/previous" 2>/dev/null || true)"
for p in "$BASE"/packages/*; do
  n="$(basename "$p")"
  [ "$n" = "$ID" ] || [ "$n" = "$PREV" ] || rm -rf "$p"
done
# The runtime venv: made or upgraded when this package's wheels differ from the ones it was last filled from
# (a hash of their names and contents is kept in the venv). Only into the running system (ROOT=/), unless
# EDGELEARN_VENV=1 says the ROOT folder is for this machine's own architecture and python.
if [ -d "$HERE/wheels" ] && { [ "$ROOT" = "/" ] || [ "${EDGELEARN_VENV:-0}" = 1 ]; }; then
  WHEELS="$(cd "$HERE/wheels" && find . -type f -name '*.whl' | LC_ALL=C sort | xargs -r sha256sum | sha256sum)"
  WHEELS="${WHEELS%% *}"
  STAMP="$BASE/venv/edgelearn-wheels.sha256"
  if [ ! -x "$BASE/venv/bin/edgelearn" ] || [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WHEELS" ]; then
    [ -x "$BASE/venv/bin/python" ] || python3 -m venv "$BASE/venv"
    "$BASE/venv/bin/python" -m pip install -q --upgrade --upgrade-strategy eager --no-index \
      --find-links "$HERE/wheels" edgelearn
    # same version, rebuilt wheel: --upgrade keeps the installed one, so reinstall edgelearn itself
    "$BASE/venv/bin/python" -m pip install -q --force-reinstall --no-deps --no-index --find-links "$HERE/wheels" \
      edgelearn
    echo "$WHEELS" > "$STAMP.tmp"
    mv "$STAMP.tmp" "$STAMP"
    echo "edgelearn runtime installed from the package's wheels"
  fi
fi
if [ "$ROOT" = "/" ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable edgelearn-device.service
  systemctl restart edgelearn-device.service
fi
echo "edgelearn package $ID installed in $ROOT"
