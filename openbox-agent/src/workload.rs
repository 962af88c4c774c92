//! Which container (and Kubernetes pod) a process runs in, for the resource attributes
//! of its spans.
//!
//! The container id comes from the process's cgroup path, which every runtime names
//! after the container: podman (`libpod-<id>`, under `libpod_parent/` with cgroupfs or
//! `machine.slice/libpod-<id>.scope` with systemd), docker (`docker/<id>`,
//! `docker-<id>.scope`), containerd (`cri-containerd-<id>.scope`, or `<id>` under a
//! `pod<uid>` directory with cgroupfs) and CRI-O (`crio-<id>.scope`). The pod uid is
//! the `pod<uid>` component kubelet puts above it (`kubepods-…-pod<uid>.slice` with the
//! systemd driver, dashes written as underscores). Pod name and namespace are not in the
//! cgroup path: they come from the worker's environment, `OPENBOX_POD_NAME` and
//! `OPENBOX_POD_NAMESPACE`, set with the downward API (`fieldRef: metadata.name` and
//! `metadata.namespace`).

use serde_json::{Map, Value};

use crate::conn::Pid;

/// The OpenTelemetry resource attributes of a process in a container; empty on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workload {
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
}

pub const ENV_POD_NAME: &str = "OPENBOX_POD_NAME";
pub const ENV_POD_NAMESPACE: &str = "OPENBOX_POD_NAMESPACE";

impl Workload {
    /// Reads /proc/PID/cgroup and /proc/PID/environ. A process that is gone, or whose
    /// environment cannot be read, gives what could be read.
    pub fn of(pid: Pid) -> Workload {
        let mut w = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map(|text| from_cgroup(&text))
            .unwrap_or_default();
        if w.container_id.is_some() {
            if let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) {
                w.pod_name = env_var(&environ, ENV_POD_NAME);
                w.pod_namespace = env_var(&environ, ENV_POD_NAMESPACE);
            }
        }
        w
    }

    pub fn is_empty(&self) -> bool {
        *self == Workload::default()
    }

    /// The semantic-convention names: `container.id`, `k8s.pod.uid`, `k8s.pod.name`,
    /// `k8s.namespace.name`.
    pub fn attributes(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("container.id", &self.container_id),
            ("k8s.pod.uid", &self.pod_uid),
            ("k8s.pod.name", &self.pod_name),
            ("k8s.namespace.name", &self.pod_namespace),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
    }

    /// Adds the attributes to a span's (those already there are kept).
    pub fn annotate(&self, attributes: &mut Map<String, Value>) {
        for (k, v) in self.attributes() {
            attributes
                .entry(k)
                .or_insert_with(|| Value::String(v.to_string()));
        }
    }
}

/// The container id and pod uid named by a /proc/PID/cgroup file (v1 or v2 lines).
pub fn from_cgroup(text: &str) -> Workload {
    let mut w = Workload::default();
    for line in text.lines() {
        // hierarchy-ID:controllers:path; the path may itself hold colons.
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        if w.container_id.is_none() {
            // The innermost component naming a container: a runtime's own nested
            // cgroups (e.g. systemd inside the container) sit below it.
            w.container_id = components.iter().rev().find_map(|c| container_id(c));
        }
        if w.pod_uid.is_none() {
            w.pod_uid = components.iter().find_map(|c| pod_uid(c));
        }
    }
    w
}

/// `libpod-<id>.scope`, `docker-<id>.scope`, `cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, or a bare 64-hex-digit id. The monitors runtimes run beside the
/// container (`libpod-conmon-<id>`, `crio-conmon-<id>`) are not the container.
fn container_id(component: &str) -> Option<String> {
    let c = component.strip_suffix(".scope").unwrap_or(component);
    if c.contains("conmon") {
        return None;
    }
    let id = c.rsplit('-').next().unwrap_or(c);
    let is_id = id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
    is_id.then(|| id.to_ascii_lowercase())
}

/// `pod<uid>` (cgroupfs driver) or `kubepods-<qos>-pod<uid_with_underscores>.slice`
/// (systemd driver).
fn pod_uid(component: &str) -> Option<String> {
    let c = component.strip_suffix(".slice").unwrap_or(component);
    // The systemd form's uid has underscores, so its last `-pod` starts it; the
    // cgroupfs form is the whole component.
    let uid = match c.rfind("-pod") {
        Some(i) => &c[i + 4..],
        None => c.strip_prefix("pod")?,
    }
    .replace('_', "-");
    let well_formed = uid.len() == 36
        && uid.bytes().enumerate().all(|(i, b)| {
            matches!(i, 8 | 13 | 18 | 23) == (b == b'-') && (b == b'-' || b.is_ascii_hexdigit())
        });
    well_formed.then_some(uid)
}

/// The value of `name` in a NUL-separated environment block.
fn env_var(environ: &[u8], name: &str) -> Option<String> {
    environ.split(|b| *b == 0).find_map(|entry| {
        let rest = entry.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
        let v = String::from_utf8_lossy(rest).into_owned();
        (!v.is_empty()).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2a6c1e9b8d7f6a5c4b3a2918e7d6c5b4a39281f0e9d8c7b6a5f4e3d2c1b0a9";
    const UID: &str = "5b2f9e1c-7a3d-4c8e-9f10-2a3b4c5d6e7f";

    #[test]
    fn podman_with_cgroupfs_on_a_hybrid_host() {
        let text = format!(
            "12:pids:/libpod_parent/libpod-{ID}\n1:name=systemd:/libpod_parent/libpod-{ID}\n0::/libpod_parent/libpod-{ID}\n"
        );
        let w = from_cgroup(&text);
        assert_eq!(w.container_id.as_deref(), Some(ID));
        assert_eq!(w.pod_uid, None);
    }

    #[test]
    fn podman_and_docker_with_systemd() {
        for path in [
            format!("/machine.slice/libpod-{ID}.scope"),
            format!("/system.slice/docker-{ID}.scope"),
            format!("/docker/{ID}"),
            // systemd inside the container adds its own cgroups below the container's.
            format!("/machine.slice/libpod-{ID}.scope/init.scope"),
        ] {
            let w = from_cgroup(&format!("0::{path}\n"));
            assert_eq!(w.container_id.as_deref(), Some(ID), "{path}");
        }
    }

    #[test]
    fn the_runtime_monitor_is_not_the_container() {
        let w = from_cgroup(&format!("0::/machine.slice/libpod-conmon-{ID}.scope\n"));
        assert_eq!(w.container_id, None);
    }

    #[test]
    fn kubernetes_pods_with_either_cgroup_driver() {
        let systemd = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope\n",
            UID.replace('-', "_")
        );
        let cgroupfs = format!("0::/kubepods/burstable/pod{UID}/{ID}\n");
        let crio = format!(
            "0::/kubepods.slice/kubepods-pod{}.slice/crio-{ID}.scope\n",
            UID.replace('-', "_")
        );
        for text in [systemd, cgroupfs, crio] {
            let w = from_cgroup(&text);
            assert_eq!(w.container_id.as_deref(), Some(ID), "{text}");
            assert_eq!(w.pod_uid.as_deref(), Some(UID), "{text}");
        }
    }

    #[test]
    fn host_processes_have_no_workload() {
        for text in [
            "0::/user.slice/user-0.slice/session-3.scope\n",
            "0::/\n",
            "12:pids:/system.slice/ssh.service\n0::/init.scope\n",
            "garbage without colons\n",
        ] {
            assert!(from_cgroup(text).is_empty(), "{text}");
        }
    }

    #[test]
    fn pod_name_and_namespace_come_from_the_environment() {
        let environ = b"PATH=/bin\0OPENBOX_POD_NAME=worker-7d9\0OPENBOX_POD_NAMESPACE=\0X=1\0";
        assert_eq!(
            env_var(environ, ENV_POD_NAME).as_deref(),
            Some("worker-7d9")
        );
        assert_eq!(env_var(environ, ENV_POD_NAMESPACE), None);
        assert_eq!(env_var(environ, "OPENBOX_POD"), None);
    }

    #[test]
    fn attributes_use_the_semantic_convention_names() {
        let w = Workload {
            container_id: Some(ID.into()),
            pod_uid: None,
            pod_name: Some("worker-7d9".into()),
            pod_namespace: Some("agents".into()),
        };
        let mut attrs = Map::new();
        attrs.insert("k8s.pod.name".into(), Value::String("kept".into()));
        w.annotate(&mut attrs);
        assert_eq!(attrs["container.id"], ID);
        assert_eq!(attrs["k8s.pod.name"], "kept");
        assert_eq!(attrs["k8s.namespace.name"], "agents");
        assert!(!attrs.contains_key("k8s.pod.uid"));
    }

    #[test]
    fn this_process_is_read_without_error() {
        // Whatever this test runs in (host or container), reading itself must work.
        let _ = Workload::of(std::process::id());
    }
}
