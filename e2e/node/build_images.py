#!/usr/bin/env python3
"""The images the node e2e suite's [NodeConformance] specs run, made offline under their real
names (test/utils/image/manifest.go of the pinned Kubernetes release), from Debian packages and
the Go programs the suite's own module builds (agnhost, nonewprivs' nnp). Each stands in for the
upstream image with what the specs use of it; what differs is said beside it.

Usage: build_images.py build BUILD_DIR LAYOUT_DIR AGNHOST NNP PAUSE
       build_images.py push LAYOUT_DIR REGISTRY     (as hack/fixtures/build_images.py push)

BUILD_DIR holds debs/ (busybox, nginx, nginx-common .debs); PAUSE is the fixtures' static pause.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "hack", "fixtures"))
import build_images as fx  # noqa: E402  (the fixtures' layer and layout writers)

# Repositories as pushed to the local registry, which berth reaches as registry.k8s.io (mirror).
E2E = "e2e-test-images/"

# agnhost's image adds a user and a group that specs look up by name.
AGNHOST_PASSWD = fx.PASSWD + "user-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh\n"
AGNHOST_GROUP = fx.GROUP + "user-defined-in-image:x:1000:\ngroup-defined-in-image:x:50000:\n"


def layer_binary(b, name, src, dest, mode=0o755):
    st = fx.Stage(b.build, name)
    st.copy(src, dest, mode)
    return st


# The specs' hooks run `curl http://HOST:PORT/PATH` in agnhost containers: busybox's wget does
# the same GET (options other than -s, -q, -g are refused, so a new use shows up as a failure).
CURL = """#!/bin/sh
# berth's stand-in for curl in the node e2e agnhost image: a plain GET through busybox wget.
url=""
for a in "$@"; do
    case "$a" in
        -s | -q | -g | --silent) ;;
        -*) echo "curl (berth stand-in): option $a is not supported" >&2; exit 2 ;;
        *) url="$a" ;;
    esac
done
[ -n "$url" ] || { echo "curl (berth stand-in): no URL" >&2; exit 2; }
exec wget -q -O - "$url"
"""


def layer_agnhost_users(b):
    st = fx.Stage(b.build, "agnhost-users")
    st.write("etc/passwd", AGNHOST_PASSWD)
    st.write("etc/group", AGNHOST_GROUP)
    st.mkdir("home/user-defined-in-image", owner=(1000, 1000))
    st.write("usr/bin/curl", CURL, 0o755)
    return st


def build(b, layout_dir, agnhost, nnp, pause):
    L = fx.Layout(layout_dir)
    bb = fx.layer_busybox(b)
    env = {"Env": [fx.PATH_ENV]}
    # busybox: the upstream image is busybox alone, as here.
    L.tag(L.image([bb], dict(env, Cmd=["sh"])), E2E + "busybox:1.37.0-2")
    # agnhost: upstream is alpine with bind-tools, curl, netcat, iproute2, iperf, bash; here busybox
    # (sh, nc, wget, ip, nslookup) and a curl stand-in (CURL) under the same binary.
    ag = layer_binary(b, "agnhost", agnhost, "agnhost")
    L.tag(L.image([bb, layer_agnhost_users(b), ag], dict(env, Entrypoint=["/agnhost"], Cmd=["pause"])),
          E2E + "agnhost:2.66.1")
    # nginx: Debian's nginx over busybox, serving on 80 as upstream's alpine nginx does.
    L.tag(L.image([bb, fx.layer_nginx(b)], dict(env, Cmd=["nginx", "-g", "daemon off;"],
                                               ExposedPorts={"80/tcp": {}})),
          E2E + "nginx:1.27.0-2")
    # nonewprivs: the suite's own nnp, setuid root (upstream: alpine + nnp).
    n = layer_binary(b, "nnp-go", nnp, "usr/local/bin/nnp", 0o4755)
    L.tag(L.image([bb, n], dict(env, Cmd=["nnp"])), E2E + "nonewprivs:1.4")
    # nonroot: upstream is debian-base with USER 1234.
    L.tag(L.image([bb], dict(env, Cmd=["sh"], User="1234")), E2E + "nonroot:1.5")
    # glibc-dns-testing: upstream is debian with dnsutils; busybox here is glibc-linked (Debian's),
    # and its hostname/nslookup are what the hostname specs run.
    L.tag(L.image([bb], dict(env, Cmd=["sh"])), E2E + "glibc-dns-testing:2.1.1")
    # pause: the fixtures' static pause (upstream: build/pause/linux/pause.c).
    pa = layer_binary(b, "pause-3.10", pause, "pause")
    L.tag(L.image([pa], dict(env, Entrypoint=["/pause"], User="65535:65535")), "pause:3.10.2")
    L.finish()
    return L


def main():
    if len(sys.argv) == 7 and sys.argv[1] == "build":
        L = build(fx.Builder(sys.argv[2]), sys.argv[3], *sys.argv[4:7])
        print("built %d tags in %s" % (len(L.refs), sys.argv[3]))
    elif len(sys.argv) == 4 and sys.argv[1] == "push":
        fx.main()
    else:
        print(__doc__)
        sys.exit(2)


if __name__ == "__main__":
    main()
