//! The Kubernetes manifests (deploy/kubernetes) and the Helm chart (deploy/helm), checked
//! as strictly as the API server would: every document is decoded into the k8s.io/api
//! types with unknown and duplicate fields refused (tests/k8s-validate), the chart passes
//! `helm lint --strict` and renders, for each documented value set, to objects that pass
//! the same checker, and the plain manifests deploy what the chart deploys. No cluster
//! runs here, so this is what "the manifests are valid" can mean.
//!
//! `cargo xtask test` builds the checker and Helm and exports OPENBOX_K8S_VALIDATE_BIN
//! and OPENBOX_HELM_BIN.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use openbox_agent::governance::{policy::Policy, GovernanceConfig, RawSettings};
use openbox_testkit::{env_path, workspace_root, TempDir};

const CHART: &str = "deploy/helm/openbox-agent";
const MANIFESTS: &str = "deploy/kubernetes";
const FIXTURES: &str = "tests/k8s-validate/testdata";
/// What `helm template` assumes of the cluster: a `go install`ed Helm has no default
/// Kubernetes version of its own (it would assume 1.20, below the chart's kubeVersion).
const KUBE_VERSION: &str = "1.33.0";
/// The release the plain manifests correspond to.
const RELEASE: &str = "openbox-agent";
const NAMESPACE: &str = "openbox-system";

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {shown}: {e}"));
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("writing to {shown}: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {shown}: {e}"));
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The checker over files (or `-` with `stdin`).
fn validate(args: &[&str], stdin: Option<&str>) -> Output {
    run(
        Command::new(env_path("OPENBOX_K8S_VALIDATE_BIN"))
            .args(args)
            .current_dir(workspace_root()),
        stdin,
    )
}

/// Helm with its cache, config and data directories in a throwaway place, so a test
/// never reads or writes the user's.
struct Helm {
    home: TempDir,
}

impl Helm {
    fn new() -> Helm {
        Helm {
            home: TempDir::new("helm"),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        run(
            Command::new(env_path("OPENBOX_HELM_BIN"))
                .args(args)
                .env("HELM_CACHE_HOME", self.home.join("cache"))
                .env("HELM_CONFIG_HOME", self.home.join("config"))
                .env("HELM_DATA_HOME", self.home.join("data"))
                .current_dir(workspace_root()),
            None,
        )
    }

    /// `helm template` of the chart as release openbox-agent in openbox-system, with
    /// extra arguments (`--set …`); panics when it does not render.
    fn render(&self, extra: &[&str]) -> String {
        let mut args = vec![
            "template",
            RELEASE,
            CHART,
            "--namespace",
            NAMESPACE,
            "--kube-version",
            KUBE_VERSION,
        ];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        assert!(out.ok, "helm {} failed:\n{}", args.join(" "), out.stderr);
        out.stdout
    }
}

fn assert_valid(what: &str, out: &Output) {
    assert!(
        out.ok,
        "{what} failed the strict check:\n{}{}",
        out.stdout, out.stderr
    );
}

#[test]
fn the_plain_manifests_decode_strictly_into_the_kubernetes_types() {
    let out = validate(&[MANIFESTS], None);
    assert_valid(MANIFESTS, &out);
    // namespace, serviceaccount, secret, configmap, daemonset, examples/worker: none may
    // be skipped as "empty".
    assert!(
        out.stdout.contains("6 object(s) valid"),
        "expected the 6 objects of {MANIFESTS} to be checked: {}",
        out.stdout
    );
}

/// The negative test: each fixture holds one kind of mistake, and the checker must fail
/// naming it.
#[test]
fn a_misspelled_field_or_wrong_value_fails_the_checker_naming_it() {
    let cases: &[(&str, &[&str])] = &[
        (
            "misspelled-field.yaml",
            &[r#"unknown field "spec.template.spec.hostPid""#],
        ),
        (
            "misspelled-nested.yaml",
            &[
                r#"unknown field "spec.template.spec.tolerations[0].operater""#,
                r#"unknown field "spec.template.spec.containers[0].volumeMounts[0].mountpath""#,
            ],
        ),
        (
            "wrong-type.yaml",
            &[
                "cannot unmarshal string",
                "readOnlyRootFilesystem of type bool",
            ],
        ),
        (
            "duplicate-key.yaml",
            &[r#"key "config.toml" already set in map"#],
        ),
        (
            "unknown-kind.yaml",
            &["apps/v1 DaemonSett is not a kind this checker knows"],
        ),
        (
            "semantic-errors.yaml",
            &[
                "does not select the pod template's labels",
                r#"hostPath.type "DirectoryOrCreat" is not a HostPathType"#,
                r#"mounts volume "spool", which the pod does not declare"#,
                r#"livenessProbe uses port "metrics", which the container does not name"#,
                r#"capability "CAP_BPF" is not a Linux capability name"#,
            ],
        ),
    ];
    let listed: Vec<&str> = cases.iter().map(|(f, _)| *f).collect();
    for entry in fs::read_dir(workspace_root().join(FIXTURES)).expect("reading the fixtures") {
        let name = entry.expect("a fixture").file_name();
        let name = name.to_string_lossy();
        assert!(
            listed.contains(&name.as_ref()),
            "{FIXTURES}/{name} has no expectation in this test"
        );
    }
    for (file, expected) in cases {
        let path = format!("{FIXTURES}/{file}");
        let out = validate(&[&path], None);
        assert!(!out.ok, "{path} passed the checker: {}", out.stdout);
        for e in *expected {
            assert!(
                out.stderr.contains(e),
                "checking {path} did not report `{e}`:\n{}",
                out.stderr
            );
        }
    }
}

#[test]
fn the_chart_passes_helm_lint_strict_with_each_value_set() {
    let helm = Helm::new();
    for set in value_sets() {
        let mut args = vec!["lint", "--strict", CHART, "--kube-version", KUBE_VERSION];
        args.extend_from_slice(set);
        let out = helm.run(&args);
        assert!(
            out.ok && out.stdout.contains("0 chart(s) failed"),
            "helm {} failed:\n{}{}",
            args.join(" "),
            out.stdout,
            out.stderr
        );
    }
}

/// The documented ways to install: the defaults (embedded policy), Core with a key the
/// chart puts in a Secret, Core with an existing Secret, the privileged fallback, extra
/// flags and variables, and a longer governance timeout.
fn value_sets() -> Vec<&'static [&'static str]> {
    vec![
        &[],
        &[
            "--set",
            "core.url=https://core.example.com",
            "--set",
            "core.apiKey=obx_test_abc",
        ],
        &[
            "--set",
            "core.url=https://core.example.com",
            "--set",
            "core.existingSecret=my-core-key",
            "--set",
            "core.existingSecretKey=key",
        ],
        &["--set", "privileged=true"],
        &[
            "--set",
            "extraArgs={--span-limit=5000}",
            "--set-json",
            r#"extraEnv=[{"name":"OPENBOX_LOG","value":"info"}]"#,
            "--set-json",
            r#"podAnnotations={"prometheus.io/scrape":"true"}"#,
        ],
        &["--set", "governance.timeoutSeconds=60"],
        &["--set", "btf.mount=false"],
    ]
}

#[test]
fn the_rendered_chart_decodes_strictly_for_each_value_set() {
    let helm = Helm::new();
    for set in value_sets() {
        let rendered = helm.render(set);
        let out = validate(&["-"], Some(&rendered));
        assert_valid(&format!("helm template {}", set.join(" ")), &out);
    }
}

#[test]
fn a_misspelled_field_in_the_chart_values_fails_the_rendered_check() {
    let rendered = Helm::new().render(&["--set-json", r#"tolerations=[{"operater":"Exists"}]"#]);
    let out = validate(&["-"], Some(&rendered));
    assert!(!out.ok, "a misspelt toleration passed: {}", out.stdout);
    assert!(
        out.stderr
            .contains(r#"unknown field "spec.template.spec.tolerations[0].operater""#),
        "{}",
        out.stderr
    );
}

/// The checker's -compare of deploy/kubernetes against the chart rendered with `set`.
fn compare_with_chart(set: &[&str]) -> Output {
    let dir = TempDir::new("chart");
    let rendered = dir.join("rendered.yaml");
    fs::write(&rendered, Helm::new().render(set)).expect("writing the rendered chart");
    validate(
        &[
            "-compare",
            &format!("{MANIFESTS}/daemonset.yaml"),
            &format!("{MANIFESTS}/configmap.yaml"),
            "--",
            &rendered.display().to_string(),
        ],
        None,
    )
}

#[test]
fn the_plain_manifests_deploy_what_the_chart_deploys() {
    let out = compare_with_chart(&[]);
    assert!(
        out.ok,
        "deploy/kubernetes and the chart's defaults have drifted apart (change both):\n{}",
        out.stderr
    );
    // And the comparison sees a difference when there is one.
    let out = compare_with_chart(&["--set", "capabilities={BPF,PERFMON}"]);
    assert!(
        !out.ok && out.stderr.contains("the DaemonSets differ"),
        "a chart with fewer capabilities compared equal: {}{}",
        out.stdout,
        out.stderr
    );
    let out = compare_with_chart(&["--set", "policy=default_verdict = \"block\""]);
    assert!(
        !out.ok
            && out
                .stderr
                .contains("ConfigMap openbox-agent-config differs"),
        "a chart with another policy compared equal: {}{}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn the_termination_grace_period_outlasts_the_governance_timeout() {
    let helm = Helm::new();
    for (timeout, grace) in [("30", "45"), ("60", "75")] {
        let rendered = helm.render(&["--set", &format!("governance.timeoutSeconds={timeout}")]);
        assert!(
            rendered.contains(&format!("terminationGracePeriodSeconds: {grace}\n"))
                && rendered.contains(&format!(
                    "name: OPENBOX_GOVERNANCE_TIMEOUT\n              value: \"{timeout}\""
                )),
            "governance timeout {timeout}s should give a {grace}s grace period:\n{rendered}"
        );
    }
}

/// The ConfigMap's config.toml and policy.toml load in the agent's own parsers (which
/// refuse unknown keys), and the spool lands on the hostPath volume.
#[test]
fn the_configmap_settings_and_policy_load_in_the_agent() {
    let dir = TempDir::new("configmaps");
    let out = validate(
        &[
            "-write-configmaps",
            &dir.arg(),
            &format!("{MANIFESTS}/configmap.yaml"),
        ],
        None,
    );
    assert_valid("configmap.yaml", &out);
    let config: PathBuf = dir.join("openbox-agent-config/config.toml");
    let cfg = GovernanceConfig::load_with_env(&RawSettings::default(), Some(&config), &|_| None)
        .unwrap_or_else(|e| panic!("{}: {e}", config.display()));
    assert_eq!(cfg.spool_dir, Path::new("/var/lib/openbox-agent/spool"));
    let policy_file = cfg
        .policy_file
        .clone()
        .expect("config.toml names the local policy");
    assert_eq!(
        policy_file,
        dir.join("openbox-agent-config/policy.toml"),
        "policy_file must be relative to config.toml (both are keys of one ConfigMap)"
    );
    Policy::load(&policy_file).unwrap_or_else(|e| panic!("{}: {e}", policy_file.display()));
}
