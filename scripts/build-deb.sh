#!/usr/bin/env bash
# Builds the Debian packages of shoal and lints them.
#
#   scripts/build-deb.sh [--arch amd64|arm64|all] [--out DIR]
#
# For each architecture: builds the release binary (arm64: cross-built with
# aarch64-linux-gnu-gcc, see .cargo/config.toml), strips it, lays the package
# tree out by hand from packaging/ (control, maintainer scripts, copyright,
# changelog, man page), docs/shoal.example.toml (the conffile
# /etc/shoal/shoal.toml) and scripts/systemd/ (the units, rewritten for the
# package: ExecStart=/usr/bin/shoal, User=shoal instead of DynamicUser=yes),
# builds shoal_<version>_<arch>.deb with dpkg-deb and runs lintian on it:
# any error or warning fails the build. The version is Cargo.toml's, and
# packaging/changelog must have an entry for it.
#
# Default: --arch of this machine (dpkg --print-architecture), --out target/deb.
# Missing tools (dpkg, lintian, binutils, gcc-aarch64-linux-gnu, qemu-user, the rustup
# target) are installed with apt-get / rustup, so a fresh Debian clone works.
# Prints one line per package: path, size, and the time the build took.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
umask 022

ARCH="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
OUT="$ROOT/target/deb"
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) ARCH="${2:?--arch needs amd64, arm64 or all}"; shift 2 ;;
        --arch=*) ARCH="${1#--arch=}"; shift ;;
        --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
        --out=*) OUT="${1#--out=}"; shift ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-deb: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$ARCH" in
    amd64|arm64) ARCHES=("$ARCH") ;;
    all) ARCHES=(amd64 arm64) ;;
    *) echo "build-deb: --arch must be amd64, arm64 or all, not '$ARCH'" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

die() { echo "build-deb: $*" >&2; exit 1; }
log() { echo "build-deb: $*" >&2; }

# ---- tools -----------------------------------------------------------------
APT_UPDATED=0
apt_install() {
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    command -v apt-get >/dev/null || die "missing $* and no apt-get to install it"
    if [ "$APT_UPDATED" -eq 0 ]; then
        "${sudo[@]}" apt-get update -qq
        APT_UPDATED=1
    fi
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

need_tools() {
    local pkgs=()
    command -v dpkg-deb >/dev/null || pkgs+=(dpkg)
    command -v lintian >/dev/null || pkgs+=(lintian)
    command -v objdump >/dev/null || pkgs+=(binutils)
    command -v gzip >/dev/null || pkgs+=(gzip)
    if [[ " ${ARCHES[*]} " == *" arm64 "* ]]; then
        command -v aarch64-linux-gnu-gcc >/dev/null || pkgs+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
        command -v aarch64-linux-gnu-strip >/dev/null || pkgs+=(binutils-aarch64-linux-gnu)
        command -v qemu-aarch64 >/dev/null || pkgs+=(qemu-user)
    fi
    [ ${#pkgs[@]} -eq 0 ] || apt_install "${pkgs[@]}"
    command -v cargo >/dev/null || die "cargo is missing: install Rust (rustup.rs), 1.90 or newer"
    if [[ " ${ARCHES[*]} " == *" arm64 "* ]] && command -v rustup >/dev/null; then
        rustup target list --installed | grep -qx aarch64-unknown-linux-gnu \
            || rustup target add aarch64-unknown-linux-gnu
    fi
}

# ---- metadata --------------------------------------------------------------
# [workspace.package] of the root Cargo.toml holds version and repository.
ws_field() {
    sed -n '/^\[workspace\.package\]/,/^\[/s/^'"$1"' *= *"\(.*\)"$/\1/p' Cargo.toml | head -n1
}
VERSION="$(ws_field version)"
HOMEPAGE="$(ws_field repository)"
[ -n "$VERSION" ] || die "no version in [workspace.package] of Cargo.toml"
[[ "$VERSION" =~ ^[0-9][A-Za-z0-9.+~]*$ ]] || die "Cargo.toml version '$VERSION' is not a Debian native version"
CHANGELOG_VERSION="$(sed -n '1s/^shoal (\([^)]*\)).*/\1/p' packaging/changelog)"
[ "$CHANGELOG_VERSION" = "$VERSION" ] \
    || die "packaging/changelog's latest entry is '$CHANGELOG_VERSION', Cargo.toml says '$VERSION': add a changelog entry"
# Every timestamp in the package is the changelog entry's (reproducible builds).
# Not exported to cargo: cc-rs tracks SOURCE_DATE_EPOCH, and a change would
# rebuild ring and everything above it instead of reusing the test build.
SOURCE_DATE_EPOCH="$(date -d "$(sed -n 's/^ -- .*>  //p' packaging/changelog | head -n1)" +%s)" \
    || die "packaging/changelog: bad date in the trailer line"

UNITS=(shoal.service shoal-prefetch.service shoal-prefetch.timer)

# ---- pieces of the package tree ----------------------------------------------

# The packaged unit: scripts/systemd/$1 for a real system user and /usr/bin.
package_unit() {
    local src="scripts/systemd/$1" dst="$2" user_sed
    if grep -q '^User=' "$src"; then
        user_sed='/^DynamicUser=yes$/d'
    else
        user_sed='s/^DynamicUser=yes$/User=shoal\nGroup=shoal/'
    fi
    {
        echo "# Packaged by scripts/build-deb.sh from scripts/systemd/$1:"
        echo "# runs as the system user shoal, made by the package's postinst."
        sed -e 's|/usr/local/bin/shoal|/usr/bin/shoal|g' \
            -e 's|^# Least privilege: an unprivileged user made up at start, owning only its state\.$|# Least privilege: the unprivileged system user shoal, owning only its state.|' \
            -e "s|^# run as shoal.service's dynamic user (the same name shares its UID) with its\$|# run as shoal.service's user with its|" \
            -e "$user_sed" "$src"
    } >"$dst"
    # The rewrite must be complete: fail loudly when scripts/systemd/ changed
    # under these patterns.
    if grep -qi 'dynamic\|/usr/local' "$dst"; then
        die "$1: the packaged unit still mentions DynamicUser or /usr/local (update package_unit in $0):
$(grep -ni 'dynamic\|/usr/local' "$dst")"
    fi
    case "$1" in
        *.service)
            grep -q '^User=shoal$' "$dst" && grep -q '^Group=shoal$' "$dst" \
                || die "$1: packaged unit lacks User=shoal / Group=shoal"
            grep -q '^ExecStart=/usr/bin/shoal ' "$dst" || die "$1: packaged unit lacks ExecStart=/usr/bin/shoal"
            grep -q '^StateDirectory=shoal$' "$dst" || die "$1: packaged unit lacks StateDirectory=shoal"
            ;;
    esac
}

# /etc/shoal/shoal.toml: the documented defaults, with data_dir set to the
# node's state directory so the CLI (`sudo -u shoal shoal trust add ...`) and
# the daemon use the same store.
package_config() {
    local dst="$1"
    {
        echo "# /etc/shoal/shoal.toml of the shoal Debian package: the documented defaults"
        echo "# (docs/shoal.example.toml, \`shoal config show\`), data_dir set to the"
        echo "# state directory of shoal.service. dpkg keeps your edits on upgrades."
        echo "#"
        sed -e 's|^#data_dir = "/var/lib/shoal"$|data_dir = "/var/lib/shoal"|' docs/shoal.example.toml
    } >"$dst"
    grep -q '^data_dir = "/var/lib/shoal"$' "$dst" \
        || die "docs/shoal.example.toml has no '#data_dir = \"/var/lib/shoal\"' line (update package_config in $0)"
}

# Depends: from the ELF's needed libraries and the newest glibc symbol version.
shlib_depends() {
    local bin="$1" objdump="$2" needed glibc libs=()
    needed="$("$objdump" -p "$bin" | awk '/NEEDED/ {print $2}')"
    glibc="$("$objdump" -T "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)"
    [ -n "$glibc" ] || die "$bin: no GLIBC symbol versions (static binary?)"
    libs+=("libc6 (>= $glibc)")
    for lib in $needed; do
        case "$lib" in
            libc.so.6|libm.so.6|libpthread.so.0|libdl.so.2|librt.so.1|ld-linux*) ;;
            libgcc_s.so.1) libs+=("libgcc-s1 (>= 4.2)") ;;
            *) die "$bin needs $lib: add its Debian package to shlib_depends in $0" ;;
        esac
    done
    local IFS=,
    echo "${libs[*]}" | sed 's/,/, /g'
}

# ---- one package --------------------------------------------------------------
build_one() {
    local arch="$1" t0 triple strip objdump run_bin bin stage deb
    t0=$(date +%s)
    case "$arch" in
        amd64)
            triple=""
            strip=strip
            objdump=objdump
            run_bin=()
            ;;
        arm64)
            triple=aarch64-unknown-linux-gnu
            strip=aarch64-linux-gnu-strip
            objdump=aarch64-linux-gnu-objdump
            run_bin=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
            ;;
    esac
    # A native amd64 build on an arm64 machine (or the reverse) is a cross build.
    local host_arch
    host_arch="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
    if [ "$arch" = amd64 ] && [ "$host_arch" != amd64 ]; then
        die "amd64 packages are built on amd64 machines only"
    fi
    if [ "$arch" = arm64 ] && [ "$host_arch" = arm64 ]; then
        triple="" strip=strip objdump=objdump run_bin=()
    fi

    log "$arch: cargo build --release --locked -p shoal-node --bin shoal ${triple:+--target $triple}"
    cargo build --release --locked -p shoal-node --bin shoal ${triple:+--target "$triple"}
    local target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
    bin="$target_dir/${triple:+$triple/}release/shoal"
    [ -x "$bin" ] || die "cargo did not produce $bin"

    stage="$(mktemp -d "$OUT/.stage-$arch.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$stage'" EXIT
    local doc="$stage/usr/share/doc/shoal"
    install -d "$stage/DEBIAN" "$stage/usr/bin" "$stage/etc/shoal" \
        "$stage/usr/lib/systemd/system" "$doc" "$stage/usr/share/man/man1"

    install -m 0755 "$bin" "$stage/usr/bin/shoal"
    "$strip" --strip-unneeded --remove-section=.comment --remove-section=.note "$stage/usr/bin/shoal"
    local got
    got="$("${run_bin[@]}" "$stage/usr/bin/shoal" --version)" || die "$arch: the stripped binary does not run"
    [ "$got" = "shoal $VERSION" ] || die "$arch: shoal --version says '$got', expected 'shoal $VERSION'"

    for u in "${UNITS[@]}"; do
        package_unit "$u" "$stage/usr/lib/systemd/system/$u"
        chmod 0644 "$stage/usr/lib/systemd/system/$u"
    done
    package_config "$stage/etc/shoal/shoal.toml"
    chmod 0644 "$stage/etc/shoal/shoal.toml"
    sed "s|@HOMEPAGE@|$HOMEPAGE|g" packaging/copyright >"$doc/copyright"
    gzip -9nc packaging/changelog >"$doc/changelog.gz"
    sed "s|@VERSION@|$VERSION|g" packaging/shoal.1 | gzip -9nc >"$stage/usr/share/man/man1/shoal.1.gz"
    chmod 0644 "$doc/copyright" "$doc/changelog.gz" "$stage/usr/share/man/man1/shoal.1.gz"

    # Control area.
    for s in postinst prerm postrm; do
        install -m 0755 "packaging/$s" "$stage/DEBIAN/$s"
    done
    echo /etc/shoal/shoal.toml >"$stage/DEBIAN/conffiles"
    local depends size
    depends="$(shlib_depends "$stage/usr/bin/shoal" "$objdump")"
    size="$(du -sk --apparent-size --exclude=DEBIAN "$stage" | cut -f1)"
    sed -e "s|@VERSION@|$VERSION|" -e "s|@ARCH@|$arch|" -e "s|@DEPENDS@|$depends|" \
        -e "s|@INSTALLED_SIZE@|$size|" -e "s|@HOMEPAGE@|$HOMEPAGE|" \
        packaging/control.in >"$stage/DEBIAN/control"
    (cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
        | xargs -0 md5sum) >"$stage/DEBIAN/md5sums"
    chmod 0644 "$stage/DEBIAN/control" "$stage/DEBIAN/conffiles" "$stage/DEBIAN/md5sums"
    find "$stage" -type d -exec chmod 0755 {} +
    find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

    deb="$OUT/shoal_${VERSION}_${arch}.deb"
    SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
    rm -rf "$stage"
    trap - EXIT

    log "$arch: lintian $deb"
    # Errors and warnings fail; info and pedantic tags are printed only.
    lintian --fail-on error,warning --display-info "$deb" >&2 \
        || die "$arch: lintian found errors or warnings in $deb"
    echo "$deb $(du -h "$deb" | cut -f1) $(( $(date +%s) - t0 ))s"
}

need_tools
for a in "${ARCHES[@]}"; do
    build_one "$a"
done
