//go:build tools

// Package tools names what critest's tests import, so the module graph and go.sum hold them
// (critest is built with `go test -c`, which needs its test dependencies).
package tools

import (
	_ "github.com/onsi/ginkgo/v2"
	_ "github.com/onsi/gomega"
	_ "sigs.k8s.io/cri-tools/pkg/benchmark"
	_ "sigs.k8s.io/cri-tools/pkg/framework"
	_ "sigs.k8s.io/cri-tools/pkg/validate"
)
