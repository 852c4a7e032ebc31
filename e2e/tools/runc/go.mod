// Pins runc, the OCI runtime the tests run as the `runc` runtime handler: Debian 12's runc
// 1.1.5 lacks the November 2025 fixes (CVE-2025-31133, CVE-2025-52565, CVE-2025-52881).
// Versions only: no code of that project lives here; e2e/tools/build-runc compiles it.
module berth.test/e2e/tools/runc

go 1.25.0

// Go 1.25+ sizes GOMAXPROCS from the cgroup's CPU limit and keeps the limit files open to
// re-read them: runc's waiting init (`runc init`, between create and start) would hold
// descriptors of the container's cgroup files (cgroup v1 cpu.cfs_quota_us, cpu.cfs_period_us)
// that a process of the pod allowed to trace it could reopen for writing. Off: runc lives
// for a moment, so GOMAXPROCS = CPUs is what it wants anyway.
godebug containermaxprocs=0

tool github.com/opencontainers/runc

require (
	cyphar.com/go-pathrs v0.2.6 // indirect
	github.com/aperturerobotics/protobuf-go-lite v0.14.0 // indirect
	github.com/checkpoint-restore/go-criu/v8 v8.3.0 // indirect
	github.com/cilium/ebpf v0.17.3 // indirect
	github.com/containerd/console v1.0.5 // indirect
	github.com/coreos/go-systemd/v22 v22.7.0 // indirect
	github.com/cpuguy83/go-md2man/v2 v2.0.7 // indirect
	github.com/cyphar/filepath-securejoin v0.7.0 // indirect
	github.com/docker/go-units v0.5.0 // indirect
	github.com/godbus/dbus/v5 v5.2.2 // indirect
	github.com/moby/sys/capability v0.5.0 // indirect
	github.com/moby/sys/mountinfo v0.7.2 // indirect
	github.com/moby/sys/user v0.4.0 // indirect
	github.com/moby/sys/userns v0.2.1 // indirect
	github.com/mrunalp/fileutils v0.5.1 // indirect
	github.com/opencontainers/cgroups v0.1.0 // indirect
	github.com/opencontainers/runc v1.5.3 // indirect
	github.com/opencontainers/runtime-spec v1.3.0 // indirect
	github.com/opencontainers/selinux v1.13.1 // indirect
	github.com/russross/blackfriday/v2 v2.1.0 // indirect
	github.com/seccomp/libseccomp-golang v0.12.0 // indirect
	github.com/sirupsen/logrus v1.9.4 // indirect
	github.com/urfave/cli v1.22.17 // indirect
	github.com/vishvananda/netlink v1.3.1 // indirect
	github.com/vishvananda/netns v0.0.5 // indirect
	golang.org/x/net v0.55.0 // indirect
	golang.org/x/sys v0.46.0 // indirect
)
