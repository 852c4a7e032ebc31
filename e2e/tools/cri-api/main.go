// cri-descriptor prints the CRI runtime.v1 API as one line per fact the wire depends on:
// every service method with its request, response and streaming; every message field with
// its number, cardinality, type and oneof; every enum value. With no argument it prints the
// API of k8s.io/cri-api at the version go.mod pins (compiled into this program); with
// -set FILE it prints the runtime.v1 file of a protoc descriptor set (berth's proto/cri.proto).
// hack/check-cri-api diffs the two, so any field berth's file lacks or gets wrong shows up.
package main

import (
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func main() {
	set := flag.String("set", "", "a FileDescriptorSet (protoc --descriptor_set_out) holding package runtime.v1")
	flag.Parse()
	file := runtimeapi.File_staging_src_k8s_io_cri_api_pkg_apis_runtime_v1_api_proto
	if *set != "" {
		f, err := fromSet(*set)
		if err != nil {
			fmt.Fprintln(os.Stderr, "cri-descriptor:", err)
			os.Exit(2)
		}
		file = f
	}
	lines := describe(file)
	sort.Strings(lines)
	fmt.Println(strings.Join(lines, "\n"))
}

// fromSet finds the runtime.v1 file in a descriptor set.
func fromSet(path string) (protoreflect.FileDescriptor, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var fds descriptorpb.FileDescriptorSet
	if err := proto.Unmarshal(raw, &fds); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	files, err := protodesc.NewFiles(&fds)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var found protoreflect.FileDescriptor
	files.RangeFiles(func(f protoreflect.FileDescriptor) bool {
		if f.Package() == "runtime.v1" {
			found = f
			return false
		}
		return true
	})
	if found == nil {
		return nil, fmt.Errorf("%s: no file of package runtime.v1", path)
	}
	return found, nil
}

func describe(f protoreflect.FileDescriptor) []string {
	var out []string
	out = append(out, "package "+string(f.Package()))
	svcs := f.Services()
	for i := 0; i < svcs.Len(); i++ {
		s := svcs.Get(i)
		out = append(out, "service "+string(s.Name()))
		ms := s.Methods()
		for j := 0; j < ms.Len(); j++ {
			m := ms.Get(j)
			out = append(out, fmt.Sprintf("rpc %s.%s(%s%s) returns (%s%s)", s.Name(), m.Name(),
				streamWord(m.IsStreamingClient()), m.Input().FullName(),
				streamWord(m.IsStreamingServer()), m.Output().FullName()))
		}
	}
	enums(f.Enums(), &out)
	messages(f.Messages(), &out)
	return out
}

func streamWord(b bool) string {
	if b {
		return "stream "
	}
	return ""
}

func enums(es protoreflect.EnumDescriptors, out *[]string) {
	for i := 0; i < es.Len(); i++ {
		e := es.Get(i)
		*out = append(*out, "enum "+string(e.FullName()))
		vs := e.Values()
		for j := 0; j < vs.Len(); j++ {
			v := vs.Get(j)
			*out = append(*out, fmt.Sprintf("value %s.%s = %d", e.FullName(), v.Name(), v.Number()))
		}
	}
}

func messages(ms protoreflect.MessageDescriptors, out *[]string) {
	for i := 0; i < ms.Len(); i++ {
		m := ms.Get(i)
		if m.IsMapEntry() {
			continue // printed as the map<K, V> type of the field that uses it
		}
		*out = append(*out, "message "+string(m.FullName()))
		fs := m.Fields()
		for j := 0; j < fs.Len(); j++ {
			*out = append(*out, field(m, fs.Get(j)))
		}
		os := m.Oneofs()
		for j := 0; j < os.Len(); j++ {
			o := os.Get(j)
			if !o.IsSynthetic() {
				*out = append(*out, fmt.Sprintf("oneof %s.%s", m.FullName(), o.Name()))
			}
		}
		enums(m.Enums(), out)
		messages(m.Messages(), out)
	}
}

func field(m protoreflect.MessageDescriptor, f protoreflect.FieldDescriptor) string {
	card := ""
	switch {
	case f.IsMap():
		card = ""
	case f.Cardinality() == protoreflect.Repeated:
		card = "repeated "
	case f.HasOptionalKeyword():
		card = "optional "
	}
	typ := typeName(f)
	if f.IsMap() {
		typ = fmt.Sprintf("map<%s, %s>", typeName(f.MapKey()), typeName(f.MapValue()))
	}
	extra := ""
	if o := f.ContainingOneof(); o != nil && !o.IsSynthetic() {
		extra += " oneof=" + string(o.Name())
	}
	if f.IsPacked() {
		extra += " packed"
	}
	return fmt.Sprintf("field %s.%s = %d %s%s%s", m.FullName(), f.Name(), f.Number(), card, typ, extra)
}

func typeName(f protoreflect.FieldDescriptor) string {
	switch f.Kind() {
	case protoreflect.MessageKind, protoreflect.GroupKind:
		return string(f.Message().FullName())
	case protoreflect.EnumKind:
		return string(f.Enum().FullName())
	default:
		return f.Kind().String()
	}
}
