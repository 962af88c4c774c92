// k8s-validate decodes Kubernetes manifests into the k8s.io/api types the API server
// uses, strictly: an unknown field (a misspelling such as `hostPid`), a field given
// twice, a value of the wrong type, or a kind this checker does not know fails, naming
// the file, the document and the field. A few cross-field rules that decoding cannot
// see, and that the API server or the kubelet would reject later, are checked too (see
// checkObject).
//
// Usage:
//
//	k8s-validate PATH...                 PATH: a manifest, a directory of them, or - (stdin)
//	k8s-validate -compare A -- B         also: the DaemonSet pod specs and ConfigMap data
//	                                     in A and in B are the same (image aside)
//	k8s-validate -write-configmaps DIR PATH...
//	                                     also: write each ConfigMap's data as files
//	                                     DIR/NAME/KEY, for the agent's own parsers
//
// Exit status: 0 when every document passes, 1 when any fails, 2 on bad usage.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	schedulingv1 "k8s.io/api/scheduling/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/intstr"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// The kinds a manifest of this project may hold. Anything else fails rather than
// passing unchecked.
var scheme = func() *runtime.Scheme {
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{
		corev1.AddToScheme,
		appsv1.AddToScheme,
		schedulingv1.AddToScheme,
		rbacv1.AddToScheme,
		policyv1.AddToScheme,
	} {
		if err := add(s); err != nil {
			panic(err)
		}
	}
	return s
}()

// object is one decoded document and where it came from.
type object struct {
	where string // "FILE#N (Kind/name)"
	obj   runtime.Object
}

func main() {
	args := os.Args[1:]
	if len(args) == 0 {
		usage()
	}
	compare := false
	writeTo := ""
	var left, right []string
	if args[0] == "-write-configmaps" {
		if len(args) < 3 {
			usage()
		}
		writeTo, left = args[1], args[2:]
	} else if args[0] == "-compare" {
		compare = true
		sep := indexOf(args, "--")
		if sep < 2 || sep == len(args)-1 {
			usage()
		}
		left, right = args[1:sep], args[sep+1:]
	} else {
		left = args
	}

	var problems []string
	a, p := load(left)
	problems = append(problems, p...)
	if compare {
		b, p := load(right)
		problems = append(problems, p...)
		problems = append(problems, compareSets(a, b)...)
	}
	if writeTo != "" && len(problems) == 0 {
		if err := writeConfigMaps(writeTo, a); err != nil {
			problems = append(problems, err.Error())
		}
	}
	for _, p := range problems {
		fmt.Fprintln(os.Stderr, p)
	}
	if len(problems) > 0 {
		fmt.Fprintf(os.Stderr, "k8s-validate: %d problem(s)\n", len(problems))
		os.Exit(1)
	}
	fmt.Printf("k8s-validate: %d object(s) valid\n", len(a))
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: k8s-validate PATH...\n       k8s-validate -compare PATH... -- PATH...\n       k8s-validate -write-configmaps DIR PATH...\n(PATH: a YAML manifest, a directory of them, or - for stdin)")
	os.Exit(2)
}

func indexOf(xs []string, x string) int {
	for i, v := range xs {
		if v == x {
			return i
		}
	}
	return -1
}

// load reads every document of every path; a directory contributes its *.yaml and
// *.yml files, recursively, in name order.
func load(paths []string) ([]object, []string) {
	var objs []object
	var problems []string
	for _, path := range paths {
		files, err := expand(path)
		if err != nil {
			problems = append(problems, err.Error())
			continue
		}
		for _, f := range files {
			o, p := loadFile(f)
			objs = append(objs, o...)
			problems = append(problems, p...)
		}
	}
	if len(objs) == 0 && len(problems) == 0 {
		problems = append(problems, fmt.Sprintf("%s: no Kubernetes object found", strings.Join(paths, " ")))
	}
	return objs, problems
}

func expand(path string) ([]string, error) {
	if path == "-" {
		return []string{"-"}, nil
	}
	info, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !info.IsDir() {
		return []string{path}, nil
	}
	var files []string
	err = filepath.WalkDir(path, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && (strings.HasSuffix(p, ".yaml") || strings.HasSuffix(p, ".yml")) {
			files = append(files, p)
		}
		return nil
	})
	sort.Strings(files)
	return files, err
}

func loadFile(path string) ([]object, []string) {
	var data []byte
	var err error
	if path == "-" {
		data, err = io.ReadAll(os.Stdin)
		path = "<stdin>"
	} else {
		data, err = os.ReadFile(path)
	}
	if err != nil {
		return nil, []string{err.Error()}
	}
	var objs []object
	var problems []string
	reader := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for n := 1; ; n++ {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s#%d: %v", path, n, err))
			break
		}
		o, p := decode(fmt.Sprintf("%s#%d", path, n), doc)
		if o != nil {
			objs = append(objs, *o)
		}
		problems = append(problems, p...)
	}
	return objs, problems
}

// decode turns one YAML document into its typed object; nil for an empty document
// (only comments, as `helm template` leaves for a disabled template).
func decode(where string, doc []byte) (*object, []string) {
	// Strict: a key given twice in the YAML is an error, not "the last one wins".
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return nil, []string{fmt.Sprintf("%s: not valid YAML: %v", where, err)}
	}
	if bytes.Equal(bytes.TrimSpace(j), []byte("null")) {
		return nil, nil
	}
	var tm metav1.TypeMeta
	if err := json.Unmarshal(j, &tm); err != nil {
		return nil, []string{fmt.Sprintf("%s: not a Kubernetes object: %v", where, err)}
	}
	if tm.APIVersion == "" || tm.Kind == "" {
		return nil, []string{fmt.Sprintf("%s: apiVersion and kind are required (got apiVersion %q, kind %q)", where, tm.APIVersion, tm.Kind)}
	}
	gvk := schema.FromAPIVersionAndKind(tm.APIVersion, tm.Kind)
	obj, err := scheme.New(gvk)
	if err != nil {
		return nil, []string{fmt.Sprintf("%s: %s %s is not a kind this checker knows (a typo in apiVersion or kind?)", where, tm.APIVersion, tm.Kind)}
	}
	// Case-sensitive, and every unknown or duplicate field is reported, as the API
	// server does with fieldValidation=Strict (encoding/json alone would accept
	// `hostpid` for `hostPID`).
	strictErrs, err := kjson.UnmarshalStrict(j, obj)
	if err != nil {
		return nil, []string{fmt.Sprintf("%s: %s: %v", where, tm.Kind, err)}
	}
	name := ""
	if m, ok := obj.(metav1.Object); ok {
		name = m.GetName()
	}
	where = fmt.Sprintf("%s (%s/%s)", where, tm.Kind, name)
	var problems []string
	for _, e := range strictErrs {
		problems = append(problems, fmt.Sprintf("%s: %v", where, e))
	}
	for _, p := range checkObject(obj) {
		problems = append(problems, fmt.Sprintf("%s: %s", where, p))
	}
	return &object{where: where, obj: obj}, problems
}

// checkObject: rules that strict decoding cannot see and that the API server or the
// kubelet would reject only once applied.
func checkObject(obj runtime.Object) []string {
	var problems []string
	if m, ok := obj.(metav1.Object); ok && m.GetName() == "" && m.GetGenerateName() == "" {
		problems = append(problems, "metadata.name is empty")
	}
	switch o := obj.(type) {
	case *appsv1.DaemonSet:
		problems = append(problems, checkSelector(o.Spec.Selector, o.Spec.Template.Labels)...)
		problems = append(problems, checkPodSpec(&o.Spec.Template.Spec)...)
		if s := o.Spec.UpdateStrategy.Type; s != "" && s != appsv1.RollingUpdateDaemonSetStrategyType && s != appsv1.OnDeleteDaemonSetStrategyType {
			problems = append(problems, fmt.Sprintf("spec.updateStrategy.type %q is not RollingUpdate or OnDelete", s))
		}
	case *appsv1.Deployment:
		problems = append(problems, checkSelector(o.Spec.Selector, o.Spec.Template.Labels)...)
		problems = append(problems, checkPodSpec(&o.Spec.Template.Spec)...)
	case *corev1.Pod:
		problems = append(problems, checkPodSpec(&o.Spec)...)
	}
	return problems
}

func checkSelector(sel *metav1.LabelSelector, podLabels map[string]string) []string {
	if sel == nil {
		return []string{"spec.selector is required"}
	}
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		return []string{fmt.Sprintf("spec.selector: %v", err)}
	}
	if s.Empty() || !s.Matches(labels.Set(podLabels)) {
		return []string{fmt.Sprintf("spec.selector %s does not select the pod template's labels %v", s, podLabels)}
	}
	return nil
}

var hostPathTypes = map[corev1.HostPathType]bool{
	corev1.HostPathUnset: true, corev1.HostPathDirectoryOrCreate: true,
	corev1.HostPathDirectory: true, corev1.HostPathFileOrCreate: true, corev1.HostPathFile: true,
	corev1.HostPathSocket: true, corev1.HostPathCharDev: true, corev1.HostPathBlockDev: true,
}

// Capability names as the container runtimes take them: without the CAP_ prefix
// (capabilities(7)). A misspelt one is only refused by the runtime when the pod starts.
var capabilities = func() map[corev1.Capability]bool {
	m := map[corev1.Capability]bool{"ALL": true}
	for _, c := range strings.Fields(`AUDIT_CONTROL AUDIT_READ AUDIT_WRITE BLOCK_SUSPEND BPF
		CHECKPOINT_RESTORE CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID IPC_LOCK IPC_OWNER
		KILL LEASE LINUX_IMMUTABLE MAC_ADMIN MAC_OVERRIDE MKNOD NET_ADMIN NET_BIND_SERVICE
		NET_BROADCAST NET_RAW PERFMON SETFCAP SETGID SETPCAP SETUID SYSLOG SYS_ADMIN SYS_BOOT
		SYS_CHROOT SYS_MODULE SYS_NICE SYS_PACCT SYS_PTRACE SYS_RAWIO SYS_RESOURCE SYS_TIME
		SYS_TTY_CONFIG WAKE_ALARM`) {
		m[corev1.Capability(c)] = true
	}
	return m
}()

func checkPodSpec(spec *corev1.PodSpec) []string {
	var problems []string
	volumes := map[string]bool{}
	for _, v := range spec.Volumes {
		if volumes[v.Name] {
			problems = append(problems, fmt.Sprintf("volume %q is declared twice", v.Name))
		}
		volumes[v.Name] = true
		if v.HostPath != nil && v.HostPath.Type != nil && !hostPathTypes[*v.HostPath.Type] {
			problems = append(problems, fmt.Sprintf("volume %q: hostPath.type %q is not a HostPathType", v.Name, *v.HostPath.Type))
		}
	}
	if sc := spec.SecurityContext; sc != nil {
		problems = append(problems, checkProfiles("spec.securityContext", sc.SeccompProfile, sc.AppArmorProfile)...)
	}
	all := append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...)
	if len(spec.Containers) == 0 {
		problems = append(problems, "the pod has no containers")
	}
	for _, c := range all {
		at := fmt.Sprintf("container %q", c.Name)
		ports := map[string]bool{}
		for _, p := range c.Ports {
			if p.Name != "" {
				ports[p.Name] = true
			}
		}
		for _, m := range c.VolumeMounts {
			if !volumes[m.Name] {
				problems = append(problems, fmt.Sprintf("%s mounts volume %q, which the pod does not declare", at, m.Name))
			}
		}
		env := map[string]bool{}
		for _, e := range c.Env {
			if env[e.Name] {
				problems = append(problems, fmt.Sprintf("%s sets env %s twice", at, e.Name))
			}
			env[e.Name] = true
		}
		probes := []struct {
			what  string
			probe *corev1.Probe
		}{{"livenessProbe", c.LivenessProbe}, {"readinessProbe", c.ReadinessProbe}, {"startupProbe", c.StartupProbe}}
		for _, p := range probes {
			if get := httpGet(p.probe); get != nil && get.Port.Type == intstr.String && !ports[get.Port.StrVal] {
				problems = append(problems, fmt.Sprintf("%s %s uses port %q, which the container does not name", at, p.what, get.Port.StrVal))
			}
		}
		if sc := c.SecurityContext; sc != nil {
			if sc.Capabilities != nil {
				for _, cp := range append(append([]corev1.Capability{}, sc.Capabilities.Add...), sc.Capabilities.Drop...) {
					if !capabilities[cp] {
						problems = append(problems, fmt.Sprintf("%s: capability %q is not a Linux capability name (give it without CAP_, in capitals)", at, cp))
					}
				}
			}
			problems = append(problems, checkProfiles(at+" securityContext", sc.SeccompProfile, sc.AppArmorProfile)...)
		}
		for res, lim := range c.Resources.Limits {
			if req, ok := c.Resources.Requests[res]; ok && req.Cmp(lim) > 0 {
				problems = append(problems, fmt.Sprintf("%s requests %s %s, more than its limit %s", at, req.String(), res, lim.String()))
			}
		}
	}
	return problems
}

func httpGet(p *corev1.Probe) *corev1.HTTPGetAction {
	if p == nil {
		return nil
	}
	return p.HTTPGet
}

func checkProfiles(at string, seccomp *corev1.SeccompProfile, apparmor *corev1.AppArmorProfile) []string {
	var problems []string
	if seccomp != nil {
		switch seccomp.Type {
		case corev1.SeccompProfileTypeUnconfined, corev1.SeccompProfileTypeRuntimeDefault, corev1.SeccompProfileTypeLocalhost:
		default:
			problems = append(problems, fmt.Sprintf("%s: seccompProfile.type %q is not Unconfined, RuntimeDefault or Localhost", at, seccomp.Type))
		}
	}
	if apparmor != nil {
		switch apparmor.Type {
		case corev1.AppArmorProfileTypeUnconfined, corev1.AppArmorProfileTypeRuntimeDefault, corev1.AppArmorProfileTypeLocalhost:
		default:
			problems = append(problems, fmt.Sprintf("%s: appArmorProfile.type %q is not Unconfined, RuntimeDefault or Localhost", at, apparmor.Type))
		}
	}
	return problems
}

// compareSets: the plain manifests and the rendered chart must deploy the same pod
// (image aside: the chart takes its tag from the chart's appVersion) and the same
// ConfigMap contents, so that neither drifts from the other.
func compareSets(a, b []object) []string {
	var problems []string
	da, pa := daemonSets(a)
	db, pb := daemonSets(b)
	problems = append(append(problems, pa...), pb...)
	if len(da) == 1 && len(db) == 1 {
		sa, sb := normalised(da[0]), normalised(db[0])
		if !reflect.DeepEqual(sa, sb) {
			problems = append(problems, "the DaemonSets differ: "+firstDifference(sa, sb))
		}
	}
	ca, cb := configMaps(a), configMaps(b)
	for name, data := range ca {
		other, ok := cb[name]
		if !ok {
			problems = append(problems, fmt.Sprintf("ConfigMap %s is only on the first side", name))
		} else if !reflect.DeepEqual(data, other) {
			problems = append(problems, fmt.Sprintf("ConfigMap %s differs: %s", name, firstDifference(data, other)))
		}
	}
	for name := range cb {
		if _, ok := ca[name]; !ok {
			problems = append(problems, fmt.Sprintf("ConfigMap %s is only on the second side", name))
		}
	}
	return problems
}

func daemonSets(objs []object) ([]*appsv1.DaemonSet, []string) {
	var out []*appsv1.DaemonSet
	for _, o := range objs {
		if d, ok := o.obj.(*appsv1.DaemonSet); ok {
			out = append(out, d)
		}
	}
	if len(out) != 1 {
		return out, []string{fmt.Sprintf("-compare wants exactly one DaemonSet on each side, found %d", len(out))}
	}
	return out, nil
}

// What must agree: the DaemonSet's strategy and pod spec, the image left out.
func normalised(d *appsv1.DaemonSet) any {
	spec := d.Spec.Template.Spec.DeepCopy()
	for i := range spec.Containers {
		spec.Containers[i].Image = ""
	}
	for i := range spec.InitContainers {
		spec.InitContainers[i].Image = ""
	}
	return struct {
		Strategy appsv1.DaemonSetUpdateStrategy `json:"updateStrategy"`
		Spec     *corev1.PodSpec                `json:"podSpec"`
	}{d.Spec.UpdateStrategy, spec}
}

func configMaps(objs []object) map[string]map[string]string {
	out := map[string]map[string]string{}
	for _, o := range objs {
		if c, ok := o.obj.(*corev1.ConfigMap); ok {
			out[c.Name] = c.Data
		}
	}
	return out
}

// firstDifference shows the first line where the two values' JSON differ.
func firstDifference(a, b any) string {
	ja, _ := json.MarshalIndent(a, "", "  ")
	jb, _ := json.MarshalIndent(b, "", "  ")
	la, lb := strings.Split(string(ja), "\n"), strings.Split(string(jb), "\n")
	for i := 0; i < len(la) || i < len(lb); i++ {
		var x, y string
		if i < len(la) {
			x = la[i]
		}
		if i < len(lb) {
			y = lb[i]
		}
		if x != y {
			return fmt.Sprintf("line %d: %q vs %q", i+1, strings.TrimSpace(x), strings.TrimSpace(y))
		}
	}
	return "(no textual difference)"
}

func writeConfigMaps(dir string, objs []object) error {
	for name, data := range configMaps(objs) {
		sub := filepath.Join(dir, name)
		if err := os.MkdirAll(sub, 0o755); err != nil {
			return err
		}
		for key, value := range data {
			if err := os.WriteFile(filepath.Join(sub, key), []byte(value), 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}
