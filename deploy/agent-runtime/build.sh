#!/usr/bin/env bash
# Builds the agent runtime image with no registry: a minimal Debian root filesystem made with
# debootstrap (from the mirror this machine's apt is configured with), Python 3 and the
# runtime's dependencies and the Syntropism SDK (sdk/python) in a venv at /opt/syntropism, a
# non-root user (uid 10001), imported with `docker import`. The result matches deploy/agent-runtime/Dockerfile.
#
# The image is tagged with a hash of its inputs and rebuilt only when they change.
# Usage: deploy/agent-runtime/build.sh   (as root: debootstrap and chroot need it)
source "$(dirname -- "${BASH_SOURCE[0]}")/../../scripts/lib.sh"

IMAGE="${SYNTROPISM_AGENT_IMAGE:-syntropism/agent-runtime}"
HERE="$SYNTROPISM_ROOT/deploy/agent-runtime"

is_root || die "run as root (debootstrap and chroot need it)"
command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable"

SDK="$SYNTROPISM_ROOT/sdk/python/syntropism"
inputs_hash() {
    {
        (cd "$HERE" && sha256sum build.sh requirements.txt requirements-pure.txt Dockerfile)
        (cd "$SDK" && find . -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum)
    } | sha256sum | cut -c1-12
}
TAG="$(inputs_hash)"
if docker image inspect "$IMAGE:$TAG" >/dev/null 2>&1; then
    docker tag "$IMAGE:$TAG" "$IMAGE:latest"
    info "$IMAGE:$TAG is up to date"
    exit 0
fi

# The suite and mirror this machine uses (deb822 sources first, then sources.list).
. /etc/os-release
SUITE="${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}"
mirror_from_apt() {
    local file
    for file in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$file" ]] || continue
        awk -v suite="$SUITE" '
            BEGIN { RS = ""; FS = "\n" }
            {
                uris = ""; ok = 0
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uris = a[2] }
                    if ($i ~ /^Suites:/ && $i ~ ("[ \t]" suite "([ \t]|$)")) ok = 1
                    if ($i ~ /^Enabled:[ \t]*no/) ok = 0
                }
                if (ok && uris != "") { print uris; exit }
            }' "$file"
    done | head -n1
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "$file" ]] || continue
        awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2; exit }' "$file"
    done | head -n1
}
MIRROR="$(mirror_from_apt | head -n1)"
[[ -n "$MIRROR" ]] || die "no Debian mirror for $SUITE in this machine's apt configuration"

command -v debootstrap >/dev/null || {
    info "installing debootstrap"
    apt-get install -y -q debootstrap >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null && apt-get install -y -q debootstrap >/dev/null; } ||
        die "cannot install debootstrap"
}

ensure_state_dir
WORK="$STATE_DIR/agent-runtime"
ROOTFS="$WORK/rootfs"
# One build at a time (two would share the root filesystem); a build that waited finds the
# image built by the other.
mkdir -p -- "$WORK"
exec 9>"$WORK/.lock"
flock 9
if docker image inspect "$IMAGE:$TAG" >/dev/null 2>&1; then
    docker tag "$IMAGE:$TAG" "$IMAGE:latest"
    info "$IMAGE:$TAG is up to date"
    exit 0
fi
rm -rf -- "$ROOTFS"
mkdir -p -- "$WORK/wheels"

info "debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    die "debootstrap failed; see $WORK/debootstrap.log"

# Wheels are fetched on the host (where PyPI is configured) for the image's Python, then
# installed offline inside the root filesystem.
PYVER="$(chroot "$ROOTFS" env -i PATH=/usr/bin:/bin python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
info "fetching wheels for Python $PYVER"
rm -rf -- "$WORK/wheels" && mkdir -p -- "$WORK/wheels"
python3 -m pip download -q -d "$WORK/wheels" -r "$HERE/requirements.txt" \
    --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any ||
    die "pip download failed"
python3 -m pip wheel -q --no-deps -w "$WORK/wheels" -r "$HERE/requirements-pure.txt" ||
    die "pip wheel failed"
mkdir -p -- "$ROOTFS/tmp/wheels"
cp -- "$WORK/wheels"/*.whl "$HERE/requirements.txt" "$HERE/requirements-pure.txt" "$ROOTFS/tmp/wheels/"
CHROOT_ENV=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8)
chroot "$ROOTFS" "${CHROOT_ENV[@]}" python3 -m venv /opt/syntropism
chroot "$ROOTFS" "${CHROOT_ENV[@]}" /opt/syntropism/bin/pip install -q --no-index --no-cache-dir \
    --find-links /tmp/wheels -r /tmp/wheels/requirements.txt -r /tmp/wheels/requirements-pure.txt
# The SDK: pure Python, copied into the venv (its dependencies are the wheels above).
SITE="$(chroot "$ROOTFS" "${CHROOT_ENV[@]}" /opt/syntropism/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p -- "$ROOTFS$SITE/syntropism"
(cd "$SDK" && find . -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -exec cp --parents -- {} "$ROOTFS$SITE/syntropism/" \;)
chroot "$ROOTFS" "${CHROOT_ENV[@]}" /opt/syntropism/bin/python -c 'import syntropism' ||
    die "the SDK does not import in the image"
chroot "$ROOTFS" "${CHROOT_ENV[@]}" useradd --uid 10001 --user-group --no-create-home --home-dir /workspace \
    --shell /usr/sbin/nologin agent
mkdir -p -- "$ROOTFS/workspace"
chown 10001:10001 "$ROOTFS/workspace"
rm -rf -- "$ROOTFS"/tmp/* "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/lib/apt/lists/* \
    "$ROOTFS"/usr/share/doc "$ROOTFS"/usr/share/man "$ROOTFS"/usr/share/locale

info "importing $IMAGE:$TAG"
tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/opt/syntropism/bin:/usr/local/bin:/usr/bin:/bin' \
    --change 'ENV PYTHONUNBUFFERED=1' \
    --change 'USER 10001:10001' \
    --change 'WORKDIR /workspace' \
    --change 'CMD ["/opt/syntropism/bin/python", "-m", "syntropism.launch", "/workspace/main.py"]' \
    --change "LABEL org.syntropism.inputs=$TAG" \
    - "$IMAGE:$TAG" >/dev/null
docker tag "$IMAGE:$TAG" "$IMAGE:latest"
rm -rf -- "$ROOTFS"
# Earlier builds of the image are superseded.
docker images "$IMAGE" --format '{{.Tag}}' | { grep -v -x -e latest -e "$TAG" || true; } |
    while read -r old; do docker rmi "$IMAGE:$old" >/dev/null 2>&1 || true; done
info "built $IMAGE:$TAG"
