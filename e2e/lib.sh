# Shared by the e2e runners (sourced, not run): a network namespace of their own with the
# fixtures registry on its loopback, a berthd config mirroring the upstream hosts to it, and a
# cleanup that leaves nothing behind (pod processes by the pids their records name, mounts,
# cgroups, the namespace).

# e2e_world NAME: sets ns, work, reg_pid; installs the cleanup trap. Needs $fixtures.
e2e_world() {
    ns="berth-$1-$$"
    work=$(mktemp -d "/tmp/berth-$1.XXXXXX")
    # Searchable by others, as /run is: the pods' own roots (user namespaces) go through it.
    chmod 0711 "$work"
    cgroup_tag="berth-$1-$$"
    reg_pid=""
    e2e_pids=()
    trap e2e_cleanup EXIT
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    sed -e "s#@STORAGE@#$fixtures/registry#" -e "s#@PORT@#5000#" -e "s#@READONLY@#true#" \
        hack/fixtures/registry.yml.in > "$work/registry.yml"
    nsenter --net="/run/netns/$ns" docker-registry serve "$work/registry.yml" \
        > "$work/registry.log" 2>&1 &
    reg_pid=$!
    for _ in $(seq 100); do
        nsenter --net="/run/netns/$ns" python3 -c \
            'import urllib.request; urllib.request.urlopen("http://127.0.0.1:5000/v2/")' \
            2>/dev/null && break
        sleep 0.1
    done
    cat > "$work/config.toml" <<EOT
cgroup_parent = "/$cgroup_tag"
[registries."registry.k8s.io"]
mirrors = ["http://127.0.0.1:5000"]
[registries."gcr.io"]
mirrors = ["http://127.0.0.1:5000"]
[registries."k8s.gcr.io"]
mirrors = ["http://127.0.0.1:5000"]
[registries."docker.io"]
mirrors = ["http://127.0.0.1:5000"]
EOT
}

# Kills the pod processes a berthd state directory names (monitors, inits), if still theirs.
e2e_kill_pods() {
    for rec in "$1"/pods/*/pod.json; do
        [ -f "$rec" ] || continue
        python3 - "$rec" <<'PY' || true
import json, os, signal, sys
r = json.load(open(sys.argv[1]))
for k in ("monitor", "init"):
    p = r.get(k)
    if p:
        try:
            start = open(f"/proc/{p[0]}/stat").read().rsplit(")", 1)[1].split()[19]
            if int(start) == p[1]:
                os.kill(p[0], signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            pass
PY
    done
}

e2e_cleanup() {
    set +e # every step runs, whatever the one before it answered
    for p in "${e2e_pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${e2e_pids[@]}"; do wait "$p" 2>/dev/null || true; done
    # Processes a driver started and recorded (berthd, kubelet), if still its own.
    if [ -f "$work/pids" ]; then
        while read -r p; do
            grep -qs "$work" "/proc/$p/cmdline" && kill -9 "$p" 2>/dev/null
        done < "$work/pids"
        sleep 0.5
    fi
    e2e_kill_pods "$work/state"
    [ -n "$reg_pid" ] && kill "$reg_pid" 2>/dev/null && wait "$reg_pid" 2>/dev/null
    for m in $(awk '{print $5}' /proc/self/mountinfo | grep "^$work" | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    # Cgroups of this run (berthd's and, for kubelet, its cgroup root): processes, then dirs.
    # (A v2 node has the one hierarchy at /sys/fs/cgroup; with the systemd driver the pods'
    # slices go when berth_critest.slice is stopped.)
    if [ "${BERTH_CGROUP_DRIVER:-cgroupfs}" = systemd ]; then
        systemctl stop berth_critest.slice 2>/dev/null || true
        systemctl reset-failed berth_critest.slice 2>/dev/null || true
    fi
    for h in /sys/fs/cgroup/*/"$cgroup_tag" /sys/fs/cgroup/*/"$cgroup_tag"-kubelet \
        /sys/fs/cgroup/"$cgroup_tag"; do
        [ -d "$h" ] || continue
        find "$h" -name cgroup.procs -exec cat {} + 2>/dev/null | while read -r p; do
            kill -9 "$p" 2>/dev/null || true
        done
        sleep 0.2
        find "$h" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work"
}

# Keeps the logs of a failed run beside the work dir (which the cleanup removes).
e2e_keep_logs() {
    for f in "$@"; do
        [ -f "$work/$f" ] && cp "$work/$f" "$work.$f" && echo "e2e: kept $work.$f" >&2
    done
    return 0
}
