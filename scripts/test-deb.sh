#!/usr/bin/env bash
# Install test of the Debian packages, in a throw-away Debian bookworm root,
# never on this machine's system.
#
#   scripts/test-deb.sh [--arch amd64|arm64|all] [--deb-dir DIR] [--keep]
#
# Needs root (chroot) and, the first time, the Debian mirror: the minimal
# bookworm root (mmdebstrap --variant=minbase, amd64 with arm64 as a foreign
# architecture: libc6:arm64 and libgcc-s1:arm64) is cached as a tarball under
# ~/.cache/shoal/deb-test/. Each package (default: target/deb/shoal_*_<arch>.deb
# of scripts/build-deb.sh) gets a fresh copy of that root, and then:
#   dpkg-deb -I/-c: fields and file list;
#   dpkg -i: the user shoal exists (home /var/lib/shoal, nologin), the state
#     directory is shoal's and 0750, the binary, units and conffile are in
#     place, the units are enabled, nothing is started (no systemd runs);
#   shoal --version and `shoal config show` run inside (arm64: with the
#     host's qemu-aarch64 on the root's own arm64 libc), and as user shoal
#     `shoal trust add KEY` / `trust ls` work on /var/lib/shoal (the README's
#     Pi recipe);
#   systemd-analyze verify (the host's) on the installed units, and
#     systemd-analyze security --offline: shoal.service's exposure <= 2.5;
#   dpkg -r keeps /var/lib/shoal (the trusted key), the user and the conffile;
#   dpkg -i again re-enables the units, keeps the data and the edited conffile;
#   dpkg -P removes the user, the group, /var/lib/shoal, /etc/shoal and the
#     unit links.
# The arm64 package is installed with dpkg's multiarch support (arm64 added
# as a foreign architecture, its libc dependencies satisfied by libc6:arm64),
# and its maintainer scripts run with the root's amd64 tools: this machine has
# no binfmt_misc, so an arm64-only root cannot run them. The host is checked
# untouched afterwards (no user shoal, no shoal unit links in /etc/systemd).
# Every step is bounded in time. --keep leaves the roots for inspection.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ARCH=all
DEB_DIR="$ROOT/target/deb"
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) ARCH="${2:?--arch needs amd64, arm64 or all}"; shift 2 ;;
        --arch=*) ARCH="${1#--arch=}"; shift ;;
        --deb-dir) DEB_DIR="${2:?--deb-dir needs a directory}"; shift 2 ;;
        --deb-dir=*) DEB_DIR="${1#--deb-dir=}"; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "test-deb: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$ARCH" in
    amd64|arm64) ARCHES=("$ARCH") ;;
    all) ARCHES=(amd64 arm64) ;;
    *) echo "test-deb: --arch must be amd64, arm64 or all" >&2; exit 2 ;;
esac

T_START=$(date +%s)
FAILS=0
die() { echo "test-deb: FATAL: $*" >&2; exit 1; }
step() { echo "test-deb: [$(( $(date +%s) - T_START ))s] $*"; }
ok() { echo "  ok   $*"; }
bad() { echo "  FAIL $*"; FAILS=$((FAILS + 1)); }
check() { # check "description" command... (prints the command's output on failure)
    local what="$1" out; shift
    if out="$("$@" 2>&1)"; then ok "$what"; else bad "$what"; [ -z "$out" ] || sed 's/^/       /' <<<"$out" | tail -n 20; fi
}

[ "$(id -u)" -eq 0 ] || die "needs root (chroot, dpkg in a throw-away root): sudo $0 $*"

need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v setpriv >/dev/null || need+=(util-linux)
[[ " ${ARCHES[*]} " != *" arm64 "* ]] || command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
    step "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# ---- the cached root -------------------------------------------------------------
CACHE="${SHOAL_CACHE_DIR:-$HOME/.cache/shoal}/deb-test"
# The name encodes the options: change both together.
TARBALL="$CACHE/bookworm-minbase-amd64+arm64-v1.tar"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
mkdir -p "$CACHE"
if [ ! -f "$TARBALL" ] || [ ! -s "$TARBALL" ]; then
    step "mmdebstrap bookworm (amd64 + arm64 libc) -> $TARBALL (once; ~2-4 min)"
    rm -rf "$TARBALL.tmp"
    timeout 1200 mmdebstrap --quiet --format=tar --variant=minbase --architectures=amd64,arm64 \
        --include=adduser,init-system-helpers,libc6:arm64,libgcc-s1:arm64 \
        bookworm "$TARBALL.tmp" "$MIRROR" || { rm -rf "$TARBALL.tmp"; die "mmdebstrap failed"; }
    [ -f "$TARBALL.tmp" ] || die "mmdebstrap made no tarball at $TARBALL.tmp"
    mv "$TARBALL.tmp" "$TARBALL"
fi

# ---- the host must stay untouched ---------------------------------------------------
host_state() {
    getent passwd shoal || true
    getent group shoal || true
    find /etc/systemd/system -name 'shoal*' 2>/dev/null | sort
    ls -d /var/lib/shoal /etc/shoal 2>/dev/null || true
}
HOST_BEFORE="$(host_state)"

ROOTS=()
cleanup() {
    local r
    for r in "${ROOTS[@]}"; do
        if [ "$KEEP" -eq 1 ]; then
            echo "test-deb: kept $r"
        # Only our own throw-away roots, and never across a mount point.
        elif [[ "$r" == /var/tmp/shoal-deb-test.* ]]; then
            rm -rf --one-file-system "$r"
        fi
    done
}
trap cleanup EXIT

# in ROOT cmd...: a command inside the root, bounded in time.
in_root() { local r="$1"; shift; timeout 120 chroot "$r" "$@"; }

# Runs the packaged binary: natively in the root, or (arm64 on amd64) with the
# host's qemu-aarch64 and the root's arm64 libc. Optional uid:gid first.
run_shoal() {
    local r="$1" arch="$2" user="$3"; shift 3
    if [ "$arch" = amd64 ]; then
        if [ -n "$user" ]; then
            timeout 120 chroot --userspec="$user" "$r" env HOME=/var/lib/shoal /usr/bin/shoal "$@"
        else
            timeout 120 chroot "$r" /usr/bin/shoal "$@"
        fi
    else
        # Paths inside the root are given with --config/--data-dir by the caller.
        local priv=()
        [ -z "$user" ] || priv=(setpriv --reuid="${user%%:*}" --regid="${user##*:}" --clear-groups)
        timeout 120 "${priv[@]}" env HOME=/nonexistent QEMU_CPU=cortex-a53 \
            qemu-aarch64 -L "$r" "$r/usr/bin/shoal" "$@"
    fi
}

test_one() {
    local arch="$1" deb r t0 f
    t0=$(date +%s)
    deb="$(ls "$DEB_DIR"/shoal_*_"$arch".deb 2>/dev/null | sort -V | tail -n1)"
    [ -n "$deb" ] || die "no $DEB_DIR/shoal_*_$arch.deb: run scripts/build-deb.sh --arch $arch"
    step "$arch: $deb"

    # -- the package itself
    local info list
    info="$(dpkg-deb -I "$deb")"
    list="$(dpkg-deb -c "$deb" | awk '{print $6}')"
    check "Architecture: $arch" grep -qx " Architecture: $arch" <<<"$info"
    check "Depends on libc6 and adduser" grep -Eq '^ Depends: libc6 \(>= [0-9.]+\).*adduser' <<<"$info"
    for f in ./usr/bin/shoal ./etc/shoal/shoal.toml ./usr/lib/systemd/system/shoal.service \
        ./usr/lib/systemd/system/shoal-prefetch.service ./usr/lib/systemd/system/shoal-prefetch.timer \
        ./usr/share/doc/shoal/copyright ./usr/share/doc/shoal/changelog.gz ./usr/share/man/man1/shoal.1.gz; do
        check "ships $f" grep -qx "$f" <<<"$list"
    done
    check "every file is root:root" bash -c "! dpkg-deb -c '$deb' | awk '{print \$2}' | grep -v '^root/root\$'"

    # -- a fresh root
    r="$(mktemp -d /var/tmp/shoal-deb-test.XXXXXX)"
    ROOTS+=("$r")
    chmod 0755 "$r"   # the user shoal walks through it
    step "$arch: unpacking the root"
    timeout 300 tar -xf "$TARBALL" -C "$r"
    cp "$deb" "$r/tmp/shoal.deb"

    step "$arch: dpkg -i"
    if ! in_root "$r" dpkg -i /tmp/shoal.deb; then
        bad "dpkg -i $deb"
        return
    fi
    ok "dpkg -i"
    check "dpkg status: installed" bash -c "chroot '$r' dpkg-query -W -f='\${db:Status-Abbrev}' shoal | grep -q '^ii'"
    local pw uid gid
    pw="$(in_root "$r" getent passwd shoal || true)"
    check "user shoal exists" test -n "$pw"
    check "user shoal: home /var/lib/shoal, shell nologin" grep -Eq '^shoal:x:[0-9]+:[0-9]+:[^:]*:/var/lib/shoal:/usr/sbin/nologin$' <<<"$pw"
    check "user shoal is a system user (uid < 1000)" bash -c "[ \$(cut -d: -f3 <<<'$pw') -lt 1000 ]"
    check "group shoal exists" in_root "$r" getent group shoal
    uid="$(cut -d: -f3 <<<"$pw")"
    gid="$(cut -d: -f4 <<<"$pw")"
    check "/var/lib/shoal is shoal:shoal 0750" \
        bash -c "[ \"\$(stat -c '%u:%g %a' '$r/var/lib/shoal')\" = '$uid:$gid 750' ]"
    check "/usr/bin/shoal is root:root 0755" bash -c "[ \"\$(stat -c '%U:%G %a' '$r/usr/bin/shoal')\" = 'root:root 755' ]"
    for f in shoal.service shoal-prefetch.service shoal-prefetch.timer; do
        check "unit $f installed" test -f "$r/usr/lib/systemd/system/$f"
    done
    check "/etc/shoal/shoal.toml is a conffile" \
        bash -c "chroot '$r' dpkg-query -W -f='\${Conffiles}' shoal | grep -q '/etc/shoal/shoal.toml'"
    check "shoal.service enabled" test -L "$r/etc/systemd/system/multi-user.target.wants/shoal.service"
    check "shoal-prefetch.timer enabled" test -L "$r/etc/systemd/system/timers.target.wants/shoal-prefetch.timer"

    # -- the binary runs, reads the conffile, and the README's trust recipe works
    # amd64 runs in the root and finds /etc/shoal/shoal.toml itself; arm64 runs
    # on the host (qemu) and is pointed at the root's files.
    local conf=() cfg=() teacher=/tmp/teacher ver
    if [ "$arch" != amd64 ]; then
        conf=(--config "$r/etc/shoal/shoal.toml")
        cfg=("${conf[@]}" --data-dir "$r/var/lib/shoal")
        teacher="$r/tmp/teacher"
    fi
    ver="$(run_shoal "$r" "$arch" "" --version 2>&1 || true)"
    check "shoal --version runs inside ($ver)" grep -Eq '^shoal [0-9]' <<<"$ver"
    check "shoal config show reads /etc/shoal/shoal.toml (data_dir /var/lib/shoal)" \
        bash -c "$(declare -f run_shoal); run_shoal '$r' '$arch' '' ${conf[*]} config show | grep -q '^data_dir = \"/var/lib/shoal\"'"
    local key
    key="$(run_shoal "$r" "$arch" "" --data-dir "$teacher" keygen 2>/dev/null \
        | grep -Eo '[0-9a-f]{64}' | head -n1 || true)"
    check "keygen (the teacher's key)" test -n "$key"
    check "as shoal: shoal trust add KEY --label teacher" \
        run_shoal "$r" "$arch" "$uid:$gid" "${cfg[@]}" trust add "$key" --label teacher
    check "as shoal: shoal trust ls lists it" \
        bash -c "$(declare -f run_shoal); run_shoal '$r' '$arch' '$uid:$gid' ${cfg[*]} trust ls | grep -q '$key'"

    # -- the shipped units, as installed, checked by the host's systemd-analyze
    # (the minimal root has no systemd): copied out with ExecStart pointing at
    # the installed binary, as node/tests/it/systemd.rs does for scripts/systemd.
    local ud="$r/tmp/units" sa
    mkdir -p "$ud"
    for f in shoal.service shoal-prefetch.service shoal-prefetch.timer; do
        sed "s|^ExecStart=/usr/bin/shoal |ExecStart=$r/usr/bin/shoal |" "$r/usr/lib/systemd/system/$f" >"$ud/$f"
    done
    sa="$(timeout 60 systemd-analyze verify --man=no "$ud/shoal.service" "$ud/shoal-prefetch.service" \
        "$ud/shoal-prefetch.timer" 2>&1)" && [ -z "$sa" ] \
        && ok "systemd-analyze verify (3 installed units)" || bad "systemd-analyze verify: $sa"
    sa="$(timeout 60 systemd-analyze security --offline=true --threshold=25 --no-pager "$ud/shoal.service" 2>&1)" \
        && ok "systemd-analyze security: $(grep -o 'Overall exposure level.*' <<<"$sa" | head -n1)" \
        || bad "systemd-analyze security: exposure above 2.5: $(tail -n3 <<<"$sa")"
    rm -rf "$ud"

    # -- remove keeps the data, the user and the configuration
    step "$arch: dpkg -r"
    check "dpkg -r" in_root "$r" dpkg -r shoal
    check "removed: /usr/bin/shoal gone" test ! -e "$r/usr/bin/shoal"
    check "removed: units gone" test ! -e "$r/usr/lib/systemd/system/shoal.service"
    check "removed: /var/lib/shoal kept with its trust store" \
        bash -c "grep -rqs '$key' '$r/var/lib/shoal' || ls '$r/var/lib/shoal' | grep -q ."
    check "removed: user shoal kept" in_root "$r" getent passwd shoal
    check "removed: /etc/shoal/shoal.toml kept" test -f "$r/etc/shoal/shoal.toml"
    check "dpkg status: rc" bash -c "chroot '$r' dpkg-query -W -f='\${db:Status-Abbrev}' shoal | grep -q '^rc'"

    # -- reinstall: the data is still there, the units are enabled again
    step "$arch: dpkg -i again"
    echo '# local edit (test-deb)' >>"$r/etc/shoal/shoal.toml"
    check "dpkg -i after remove" in_root "$r" dpkg -i /tmp/shoal.deb
    check "reinstalled: the edited conffile is kept" grep -q '^# local edit (test-deb)$' "$r/etc/shoal/shoal.toml"
    check "reinstalled: same uid" bash -c "[ \"\$(chroot '$r' getent passwd shoal | cut -d: -f3)\" = '$uid' ]"
    check "reinstalled: shoal.service enabled" test -L "$r/etc/systemd/system/multi-user.target.wants/shoal.service"
    check "reinstalled: the trusted key is still there" \
        bash -c "$(declare -f run_shoal); run_shoal '$r' '$arch' '$uid:$gid' ${cfg[*]} trust ls | grep -q '$key'"

    # -- purge removes everything
    step "$arch: dpkg -P"
    check "dpkg -P" in_root "$r" dpkg -P shoal
    check "purged: user shoal gone" bash -c "! chroot '$r' getent passwd shoal"
    check "purged: group shoal gone" bash -c "! chroot '$r' getent group shoal"
    check "purged: /var/lib/shoal gone" test ! -e "$r/var/lib/shoal"
    check "purged: /etc/shoal gone" test ! -e "$r/etc/shoal"
    check "purged: no shoal unit links in /etc/systemd" \
        bash -c "[ -z \"\$(find '$r/etc/systemd' -name 'shoal*' 2>/dev/null)\" ]"
    check "purged: dpkg forgot it" bash -c "! chroot '$r' dpkg-query -W shoal"
    step "$arch: done in $(( $(date +%s) - t0 ))s"
}

for a in "${ARCHES[@]}"; do
    test_one "$a"
done

if [ "$(host_state)" = "$HOST_BEFORE" ]; then
    ok "host untouched (getent passwd shoal: ${HOST_BEFORE:+present before}${HOST_BEFORE:-absent}; no shoal units in /etc/systemd)"
else
    bad "the host changed: before [$HOST_BEFORE] after [$(host_state)]"
fi
step "$FAILS failure(s), $(( $(date +%s) - T_START ))s in all"
[ "$FAILS" -eq 0 ]
