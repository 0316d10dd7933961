#!/usr/bin/env bash
# The suite against the oldest supported jax and the newest releases (CI runs only the first).
#
#   scripts/check_jax_versions.sh                 # 0.10.2 (this host's Python), 0.11.2 and the newest
#   scripts/check_jax_versions.sh 0.12.0.1        # one version
#   PYTEST_ARGS="tests/test_lowering.py" scripts/check_jax_versions.sh newest
#
# jax 0.10.x is what Python 3.11 gets; jax >= 0.11 needs Python >= 3.12, so those versions run in a
# Debian trixie chroot (python3.13), made with debootstrap on the first run ($JXENT_CHROOT, default
# ./.chroot/trixie, ignored by git) with this repository bind-mounted at /work/jxent. Needs root
# (debootstrap, mount, chroot) and Debian's package mirror. Each version gets a venv of its own
# (`pip install -e ".[test]"` plus that jax); the summary line of each run is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
CHROOT="${JXENT_CHROOT:-$ROOT/.chroot/trixie}"
PYTEST_ARGS="${PYTEST_ARGS:-tests -q -n 2}"
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(0.10.2 0.11.2 newest)
OLDEST=0.10.2  # the oldest supported (pyproject.toml: jax>=0.10.2), run on this host's Python

summary=()

run_host() {  # $1: a jax version that this host's Python gets
  local venv="$ROOT/.jax-venvs/host-$1"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q -e ".[test]" "jax==$1" "jaxlib==$1"
  local log="$ROOT/.jax-venvs/host-$1.log"
  ( "$venv/bin/python" -m pytest $PYTEST_ARGS -p no:cacheprovider 2>&1 || true ) | tee "$log"
  summary+=("jax $1 ($("$venv/bin/python" -V 2>&1)): $(tail -n 1 "$log")")
}

ensure_chroot() {
  if [ ! -x "$CHROOT/usr/bin/python3" ]; then
    mkdir -p "$(dirname "$CHROOT")"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates trixie "$CHROOT" \
      http://deb.debian.org/debian
  fi
  cp /etc/resolv.conf "$CHROOT/etc/resolv.conf"
  # this host's CA bundle (a proxy's certificate, where there is one)
  cp /etc/ssl/certs/ca-certificates.crt "$CHROOT/etc/ssl/certs/ca-certificates.crt"
  mountpoint -q "$CHROOT/proc" || mount -t proc proc "$CHROOT/proc"  # (XLA's CPU library reads it)
  mkdir -p "$CHROOT/work/jxent"
  mountpoint -q "$CHROOT/work/jxent" || mount --bind "$ROOT" "$CHROOT/work/jxent"
}

run_chroot() {  # $1: a jax version, or "newest"
  ensure_chroot
  local spec="jax" tag="$1"
  [ "$1" = newest ] || spec="jax==$1 jaxlib==$1"
  local log="$ROOT/.jax-venvs/chroot-$tag.log"
  mkdir -p "$ROOT/.jax-venvs"
  chroot "$CHROOT" env -i HOME=/root PATH=/usr/bin:/bin bash -c "
    set -e; cd /work/jxent
    [ -x /opt/venv-$tag/bin/python ] || python3 -m venv /opt/venv-$tag
    /opt/venv-$tag/bin/pip install -q --upgrade pip
    /opt/venv-$tag/bin/pip install -q -e '.[test]' $spec
    /opt/venv-$tag/bin/python -c 'import jax, sys; print(\"jax\", jax.__version__, \"python\", sys.version.split()[0])'
    /opt/venv-$tag/bin/python -m pytest $PYTEST_ARGS -p no:cacheprovider || true" 2>&1 | tee "$log"
  summary+=("jax $tag (chroot $(sed -n 's/^jax \(.*\) python \(.*\)$/\1, Python \2/p' "$log" | head -n 1)): $(tail -n 1 "$log")")
}

mkdir -p "$ROOT/.jax-venvs"
for v in "${VERSIONS[@]}"; do
  if [ "$v" = "$OLDEST" ]; then run_host "$v"; else run_chroot "$v"; fi
done
printf '%s\n' "${summary[@]}"
