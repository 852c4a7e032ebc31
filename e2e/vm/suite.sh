#!/bin/sh
# The guest side of e2e/vm/run: run by the berth-suite unit once the guest is up, from the
# results share. Runs the chosen test binaries once per cgroup driver and writes one log per
# binary and driver, and a summary, to /results; the unit powers the guest off afterwards.
. /results/env
cut -d' ' -f1 /proc/uptime >/results/boot
export BERTH_FIXTURES HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin
# What runs on the v2 node, per driver: the v2-only tests, the pod and container lifecycle and
# the security ones (`binary` or `binary:filter`). The systemd round takes the one security test
# about cgroups (emulated guests are slow; CI's time is bounded). GUEST_TESTS replaces both.
CGROUPFS_TESTS=${GUEST_TESTS:-"cgroup_v2 pods containers security stats"}
SYSTEMD_TESTS=${GUEST_TESTS:-"cgroup_v2 pods containers security:a_container_cannot_open_the_nodes_disk"}
: >/results/summary
cd /tmp
if [ -n "${CRITEST_REPO:-}" ]; then
    # e2e/vm/run --critest: the validation suite, once per driver, held against the host's
    # expectation file.
    mkdir -p "$CRITEST_REPO" /var/tmp/berth-tools
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=1048576 repo "$CRITEST_REPO"
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=1048576 tools /var/tmp/berth-tools
    for driver in ${DRIVERS:-cgroupfs systemd}; do
        t0=$(cut -d' ' -f1 /proc/uptime)
        (cd "$CRITEST_REPO" && BERTH_PREBUILT_TOOLS=$CRITEST_TOOLS \
            CARGO_TARGET_DIR=/var/tmp/berth-cargo-target BERTH_CGROUP_DRIVER=$driver \
            timeout 5400 e2e/critest/run) >"/results/critest-$driver.log" 2>&1
        rc=$?
        # The logs a failed run kept in the guest's /tmp.
        for f in /tmp/berth-critest.*.log; do
            [ -f "$f" ] && mv "$f" "/results/$driver-$(basename "$f")"
        done
        secs=$(echo "$t0 $(cut -d' ' -f1 /proc/uptime)" | awk '{printf "%d", $2 - $1}')
        counts=$(grep "^critest: [0-9]" "/results/critest-$driver.log" | tail -n 1)
        if [ "$rc" = 0 ]; then
            echo "cgroup v2, $driver driver: $counts (as expected.tsv) in ${secs} s" >>/results/summary
        else
            echo "cgroup v2, $driver driver: FAILED: $counts (rc=$rc) in ${secs} s" >>/results/summary
        fi
    done
    sync
    exit 0
fi
for driver in ${DRIVERS:-cgroupfs systemd}; do
    t0=$(cut -d' ' -f1 /proc/uptime)
    passed=0 failed=0 bad=""
    if [ "$driver" = systemd ]; then tests=$SYSTEMD_TESTS; else tests=$CGROUPFS_TESTS; fi
    for want in $tests; do
        name=${want%%:*} filter=""
        [ "$name" != "$want" ] && filter=${want#*:}
        bin=""
        for entry in $TEST_BINS; do
            [ "${entry%%=*}" = "$name" ] && bin=${entry#*=}
        done
        if [ -z "$bin" ]; then
            bad="$bad $name(no such test binary)"
            continue
        fi
        log=/results/$driver-$name.log
        # shellcheck disable=SC2086 # TEST_ARGS are several words on purpose
        BERTH_TEST_CGROUP_DRIVER=$driver timeout 1200 "$bin" $filter $TEST_ARGS >"$log" 2>&1
        rc=$?
        line=$(grep "^test result:" "$log" | tail -n 1)
        p=$(echo "$line" | sed -n 's/.* \([0-9]*\) passed.*/\1/p')
        f=$(echo "$line" | sed -n 's/.* \([0-9]*\) failed.*/\1/p')
        passed=$((passed + ${p:-0}))
        failed=$((failed + ${f:-0}))
        if [ "$rc" != 0 ] || [ -z "$line" ]; then
            bad="$bad $name(rc=$rc)"
        elif [ "${p:-0}" = 0 ]; then
            bad="$bad $name(no test ran)"
        fi
        echo "vm-suite: $driver $name rc=$rc $line" >/dev/ttyS0
    done
    t1=$(cut -d' ' -f1 /proc/uptime)
    secs=$(echo "$t0 $t1" | awk '{printf "%d", $2 - $1}')
    if [ -z "$bad" ]; then
        echo "cgroup v2, $driver driver: $passed passed, $failed failed in ${secs} s" >>/results/summary
    else
        echo "cgroup v2, $driver driver: FAILED:$bad ($passed passed, $failed failed in ${secs} s)" >>/results/summary
    fi
done
# What the tests left behind, as the host's before-stop hook would list it.
left=$(find /sys/fs/cgroup -mindepth 1 -maxdepth 1 -type d -name 'berth*' 2>/dev/null; ip netns list 2>/dev/null)
[ -n "$left" ] && echo "left behind: FAILED: $(echo $left)" >>/results/summary
sync
