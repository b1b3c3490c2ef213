//! Tests of `deploy/`: the Kubernetes manifests, the Prometheus rules and
//! configs, the Grafana dashboards and the Dockerfile, each checked with the
//! real tool where one exists (kubectl kustomize, kubernetes-validate,
//! promtool, prometheus), plus a cross-check of every metric name against the
//! metrics contract in docs/DESIGN.md.
//!
//! A missing tool FAILS the test (CI installs them, see test.sh); nothing here
//! skips silently: the binaries must be built first (`cargo build --workspace
//! --bins`, as test.sh does).
//!
//! `USHER_BLESS=1` rewrites the generated PrometheusRule from rules.yaml.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;
use usher_e2e::deploy::{
    self, assert_queries_return_data, dashboard_panels, dashboard_paths, dashboard_queries,
    deploy_dir, promql_refs, promtool, read_yaml, repo_root, require_tool, rules, rules_path,
    run_ok, Prometheus, ScrapeJob,
};
use usher_e2e::usher::{backends, concrete, Config, TempDir, Usher};
use usher_e2e::{bin_path, blocking, replace_file, spawn_worker, url, wait_until};

/// The Kubernetes version the manifests are validated against
/// (`kubernetes-validate -k`). Override with USHER_K8S_VERSION.
const K8S_VERSION: &str = "1.34.0";

// =============================================================== helpers

fn k8s_version() -> String {
    std::env::var("USHER_K8S_VERSION").unwrap_or_else(|_| K8S_VERSION.to_string())
}

fn kubernetes_dir() -> PathBuf {
    deploy_dir().join("kubernetes")
}

/// `path.to.0.key` into a YAML value; Null when absent.
fn at<'a>(v: &'a Yaml, path: &str) -> &'a Yaml {
    path.split('.')
        .fold(v, |cur, key| match key.parse::<usize>() {
            Ok(i) => &cur[i],
            Err(_) => &cur[key],
        })
}

fn s<'a>(v: &'a Yaml, path: &str) -> &'a str {
    at(v, path).as_str().unwrap_or("")
}

fn int(v: &Yaml, path: &str) -> Option<i64> {
    at(v, path).as_i64()
}

fn seq<'a>(v: &'a Yaml, path: &str) -> Vec<&'a Yaml> {
    at(v, path)
        .as_sequence()
        .map(|s| s.iter().collect())
        .unwrap_or_default()
}

/// Splits a multi-document stream (as kubectl prints it) and parses each.
fn parse_yaml_stream(text: &str) -> Vec<Yaml> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else {
            let last = docs.last_mut().unwrap();
            last.push_str(line);
            last.push('\n');
        }
    }
    docs.iter()
        .map(|d| {
            serde_yaml::from_str::<Yaml>(d)
                .unwrap_or_else(|e| panic!("invalid YAML document: {e}\n{d}"))
        })
        .filter(|d| !d.is_null())
        .collect()
}

/// Renders a kustomization with `kubectl kustomize`.
fn kustomize(dir: &Path) -> Vec<Yaml> {
    let kubectl = require_tool(
        "kubectl",
        "apt-get install -y kubectl (or any kubectl >= 1.27 with kustomize v5)",
    );
    let out = run_ok(Command::new(kubectl).arg("kustomize").arg(dir));
    parse_yaml_stream(&String::from_utf8_lossy(&out.stdout))
}

/// The two things we ship to clusters: the base alone, and the example overlay
/// (base + the Prometheus Operator component).
fn renders() -> Vec<(&'static str, Vec<Yaml>)> {
    vec![
        ("base", kustomize(&kubernetes_dir().join("base"))),
        (
            "overlays/example",
            kustomize(&kubernetes_dir().join("overlays/example")),
        ),
    ]
}

fn is_operator_object(doc: &Yaml) -> bool {
    s(doc, "apiVersion").starts_with("monitoring.coreos.com/")
}

fn find<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| s(d, "kind") == kind && s(d, "metadata.name") == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in the rendered manifests"))
}

fn labels_match(selector: &Yaml, labels: &Yaml) -> bool {
    let Some(want) = selector.as_mapping() else {
        return false;
    };
    !want.is_empty() && want.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Parses `250ms`, `5s`, `2m`, `1h`.
fn duration_secs(text: &str) -> f64 {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: f64 = num
        .parse()
        .unwrap_or_else(|_| panic!("bad duration {text:?}"));
    n * match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => panic!("bad duration unit in {text:?}"),
    }
}

/// Resolves a probe / Service target port (number or container port name).
fn container_port(container: &Yaml, port: &Yaml) -> i64 {
    if let Some(n) = port.as_i64() {
        return n;
    }
    let name = port.as_str().unwrap_or("");
    seq(container, "ports")
        .into_iter()
        .find(|p| s(p, "name") == name)
        .and_then(|p| int(p, "containerPort"))
        .unwrap_or_else(|| {
            panic!(
                "container {} has no port named {name:?}",
                s(container, "name")
            )
        })
}

fn the_container(deployment: &Yaml) -> &Yaml {
    let containers = seq(deployment, "spec.template.spec.containers");
    assert_eq!(
        containers.len(),
        1,
        "{}: one container expected",
        s(deployment, "metadata.name")
    );
    containers[0]
}

fn pre_stop_secs(container: &Yaml) -> i64 {
    let pre_stop = at(container, "lifecycle.preStop");
    if let Some(n) = int(pre_stop, "sleep.seconds") {
        return n;
    }
    // exec: ["sleep", "N"] / ["/bin/sh", "-c", "sleep N"]
    let cmd: Vec<&str> = seq(pre_stop, "exec.command")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    cmd.join(" ")
        .split_whitespace()
        .skip_while(|w| !w.ends_with("sleep"))
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("container {} has no preStop sleep", s(container, "name")))
}

/// The pod is hardened: non-root, no privilege escalation, read-only root
/// filesystem, all capabilities dropped, requests and limits set.
fn assert_hardened(deployment: &Yaml) {
    let name = s(deployment, "metadata.name");
    let pod = at(deployment, "spec.template.spec");
    let c = the_container(deployment);
    assert_eq!(
        at(pod, "securityContext.runAsNonRoot").as_bool(),
        Some(true),
        "{name}: pod runAsNonRoot"
    );
    assert!(
        int(pod, "securityContext.runAsUser").unwrap_or(0) > 0,
        "{name}: pod runAsUser must be non-zero"
    );
    assert_eq!(
        s(pod, "securityContext.seccompProfile.type"),
        "RuntimeDefault",
        "{name}: seccomp"
    );
    assert_eq!(
        at(pod, "automountServiceAccountToken").as_bool(),
        Some(false),
        "{name}: no SA token"
    );
    assert_eq!(
        at(c, "securityContext.readOnlyRootFilesystem").as_bool(),
        Some(true),
        "{name}: read-only root fs"
    );
    assert_eq!(
        at(c, "securityContext.allowPrivilegeEscalation").as_bool(),
        Some(false),
        "{name}: no escalation"
    );
    let dropped: Vec<&str> = seq(c, "securityContext.capabilities.drop")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(dropped, ["ALL"], "{name}: drop ALL capabilities");
    assert!(
        at(c, "securityContext.capabilities.add").is_null(),
        "{name}: no added capabilities"
    );
    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(
                !at(c, &format!("resources.{kind}.{res}")).is_null(),
                "{name}: resources.{kind}.{res} is set"
            );
        }
    }
    // A preferred anti-affinity by hostname that selects this very pod.
    let terms = seq(
        pod,
        "affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution",
    );
    assert!(
        terms.iter().any(
            |t| s(t, "podAffinityTerm.topologyKey") == "kubernetes.io/hostname"
                && labels_match(
                    at(t, "podAffinityTerm.labelSelector.matchLabels"),
                    at(deployment, "spec.template.metadata.labels")
                )
        ),
        "{name}: preferred podAntiAffinity by kubernetes.io/hostname over its own pods"
    );
}

/// Keys of a YAML value as a tree: mappings keep their keys, sequences keep
/// each element's tree, scalars become `~`.
fn key_tree(v: &Yaml) -> Yaml {
    match v {
        Yaml::Mapping(m) => {
            Yaml::Mapping(m.iter().map(|(k, v)| (k.clone(), key_tree(v))).collect())
        }
        Yaml::Sequence(items) => Yaml::Sequence(items.iter().map(key_tree).collect()),
        _ => Yaml::Null,
    }
}

/// The shape of the config the ConfigMaps must carry: exactly these keys.
const USHER_CONFIG_SHAPE: &str = r#"
listeners:
  - name: public
    address: 0.0.0.0:8080
admin: { address: 0.0.0.0:9901 }
routes:
  - { host: "*", path_prefix: /, upstream: app }
upstreams:
  app:
    dns: { name: usher-worker.usher.svc.cluster.local, port: 8000, refresh: 5s }
    proxy_replicas: 2
    balance: least_outstanding
    queue: { max_depth: 1024, timeout: 5s }
    health_check: { path: /healthz, interval: 2s, timeout: 1s, rise: 2, fall: 3 }
    retries: { attempts: 2 }
    timeouts: { connect: 2s, response: 60s }
limits: { max_request_body: 10MiB, max_response_buffer: 4MiB }
timeouts: { client_header: 30s, client_body: 30s, client_keepalive: 75s, shutdown_grace: 30s }
access_log: { format: json }
"#;

fn usher_config_of(docs: &[Yaml]) -> Yaml {
    let cm = find(docs, "ConfigMap", "usher-config");
    let text = cm["data"]["usher.yaml"]
        .as_str()
        .expect("ConfigMap usher-config has usher.yaml");
    serde_yaml::from_str(text).expect("usher.yaml is valid YAML")
}

// =============================================================== Kubernetes

#[test]
fn kubernetes_manifests_validate_strictly() {
    let validator = require_tool("kubernetes-validate", "pip install kubernetes-validate");
    let version = k8s_version();
    for (name, docs) in renders() {
        let core: Vec<&Yaml> = docs.iter().filter(|d| !is_operator_object(d)).collect();
        assert!(
            core.len() >= 10,
            "{name}: only {} core objects rendered",
            core.len()
        );
        let dir = TempDir::new("k8s");
        let file = dir.path().join(format!("{}.yaml", name.replace('/', "-")));
        let text: Vec<String> = core
            .iter()
            .map(|d| serde_yaml::to_string(d).expect("serialize"))
            .collect();
        std::fs::write(&file, text.join("---\n")).expect("write rendered manifests");

        let out = run_ok(
            Command::new(&validator)
                .arg("--strict")
                .arg("-k")
                .arg(&version)
                .arg(&file),
        );
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !report.contains("Couldn't find schema") && !report.contains("ERROR"),
            "{name}: kubernetes-validate could not check everything:\n{report}"
        );
        let passed = report.lines().filter(|l| l.contains(" passed ")).count();
        assert_eq!(
            passed,
            core.len(),
            "{name}: every object must pass:\n{report}"
        );
    }
}

#[test]
fn kubernetes_validate_rejects_an_unknown_field() {
    // Guards the check above: strict mode really rejects what it should.
    let validator = require_tool("kubernetes-validate", "pip install kubernetes-validate");
    let dir = TempDir::new("k8s-bad");
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec:\n  ports: [{port: 80}]\n  bogus: 1\n",
    )
    .unwrap();
    let out = Command::new(validator)
        .args(["--strict", "-k", &k8s_version()])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "strict validation accepted an unknown field"
    );
}

#[test]
fn usher_deployment_drains_gracefully_and_is_hardened() {
    for (render, docs) in renders() {
        let usher = find(&docs, "Deployment", "usher");
        let pod = at(usher, "spec.template.spec");
        let c = the_container(usher);
        assert!(
            int(usher, "spec.replicas").unwrap_or(1) >= 2,
            "{render}: at least 2 Usher replicas"
        );
        assert!(
            labels_match(
                at(usher, "spec.selector.matchLabels"),
                at(usher, "spec.template.metadata.labels")
            ),
            "{render}: selector matches the pod template"
        );
        assert_eq!(
            container_port(c, &Yaml::from("http")),
            8080,
            "{render}: client port"
        );
        assert_eq!(
            container_port(c, &Yaml::from("admin")),
            9901,
            "{render}: admin port"
        );

        assert_eq!(
            s(c, "readinessProbe.httpGet.path"),
            "/readyz",
            "{render}: readiness on /readyz"
        );
        assert_eq!(
            container_port(c, at(c, "readinessProbe.httpGet.port")),
            9901,
            "{render}: readiness on admin"
        );
        assert_eq!(
            s(c, "livenessProbe.httpGet.path"),
            "/livez",
            "{render}: liveness on /livez"
        );
        assert_eq!(
            container_port(c, at(c, "livenessProbe.httpGet.port")),
            9901,
            "{render}: liveness on admin"
        );

        // preStop delay, then the drain, both inside the grace period.
        let config = usher_config_of(&docs);
        let shutdown_grace = duration_secs(s(&config, "timeouts.shutdown_grace"));
        let pre_stop = pre_stop_secs(c);
        let grace = int(pod, "terminationGracePeriodSeconds")
            .expect("terminationGracePeriodSeconds") as f64;
        assert!(
            pre_stop >= 3,
            "{render}: preStop sleep of {pre_stop}s is too short for endpoints to update"
        );
        assert!(
            grace > pre_stop as f64 + shutdown_grace,
            "{render}: terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop}s + shutdown_grace {shutdown_grace}s"
        );

        // The config is the ConfigMap, mounted as a directory (never subPath)
        // so that updates reach the file Usher watches.
        let args: Vec<&str> = seq(c, "args").iter().filter_map(|a| a.as_str()).collect();
        let config_path = args
            .windows(2)
            .find(|w| w[0] == "-c" || w[0] == "--config")
            .map(|w| w[1])
            .unwrap_or_else(|| panic!("{render}: usher args {args:?} name no -c FILE"));
        let volume = seq(pod, "volumes")
            .into_iter()
            .find(|v| s(v, "configMap.name") == "usher-config")
            .unwrap_or_else(|| panic!("{render}: no volume from ConfigMap usher-config"));
        let mount = seq(c, "volumeMounts")
            .into_iter()
            .find(|m| s(m, "name") == s(volume, "name"))
            .unwrap_or_else(|| panic!("{render}: the config volume is not mounted"));
        assert!(
            at(mount, "subPath").is_null(),
            "{render}: a subPath mount never sees ConfigMap updates"
        );
        assert_eq!(
            at(mount, "readOnly").as_bool(),
            Some(true),
            "{render}: config mount is read-only"
        );
        let file = Path::new(config_path);
        assert_eq!(
            file.parent()
                .map(|p| p.to_string_lossy().to_string())
                .as_deref(),
            Some(s(mount, "mountPath")),
            "{render}: -c {config_path} is in the mounted directory"
        );
        let key = file.file_name().unwrap().to_string_lossy().to_string();
        let cm = find(&docs, "ConfigMap", "usher-config");
        assert!(
            cm["data"].get(&key).is_some(),
            "{render}: ConfigMap has no {key}"
        );

        assert_hardened(usher);

        // Clients: Service port 80 -> 8080.
        let svc = find(&docs, "Service", "usher");
        assert!(labels_match(
            at(svc, "spec.selector"),
            at(usher, "spec.template.metadata.labels")
        ));
        let port = seq(svc, "spec.ports")[0];
        assert_eq!(
            int(port, "port"),
            Some(80),
            "{render}: client Service port 80"
        );
        assert_eq!(
            container_port(c, at(port, "targetPort")),
            8080,
            "{render}: client Service targets 8080"
        );

        // PDB keeps at least one replica while allowing voluntary evictions.
        let pdb = find(&docs, "PodDisruptionBudget", "usher");
        assert!(labels_match(
            at(pdb, "spec.selector.matchLabels"),
            at(usher, "spec.template.metadata.labels")
        ));
        let min = int(pdb, "spec.minAvailable").expect("usher PDB uses minAvailable");
        assert!(
            min >= 1 && min < int(usher, "spec.replicas").unwrap(),
            "{render}: PDB {min} must allow an eviction"
        );
    }
}

#[test]
fn workers_run_behind_a_headless_service_with_an_hpa() {
    for (render, docs) in renders() {
        let worker = find(&docs, "Deployment", "usher-worker");
        let c = the_container(worker);
        let argv: Vec<&str> = seq(c, "command")
            .iter()
            .chain(seq(c, "args").iter())
            .filter_map(|a| a.as_str())
            .collect();
        assert!(
            argv[0].ends_with("usher-worker"),
            "{render}: runs usher-worker: {argv:?}"
        );
        let arg = |flag: &str| {
            argv.windows(2)
                .find(|w| w[0] == flag)
                .map(|w| w[1])
                .unwrap_or("")
        };
        assert_eq!(arg("--listen"), "0.0.0.0:8000", "{render}: worker --listen");
        assert_eq!(arg("--threads"), "4", "{render}: worker --threads");
        assert_eq!(
            s(c, "readinessProbe.httpGet.path"),
            "/healthz",
            "{render}: worker readiness on /healthz"
        );
        assert_eq!(
            container_port(c, at(c, "readinessProbe.httpGet.port")),
            8000
        );
        assert!(
            at(worker, "spec.replicas").is_null(),
            "{render}: the HPA owns the worker replica count"
        );
        assert_hardened(worker);
        // The worker's grace covers its preStop plus Usher's response timeout.
        let config = usher_config_of(&docs);
        let response_timeout = duration_secs(s(&config, "upstreams.app.timeouts.response"));
        let grace =
            int(worker, "spec.template.spec.terminationGracePeriodSeconds").unwrap_or(30) as f64;
        assert!(
            grace > pre_stop_secs(c) as f64 + response_timeout,
            "{render}: worker grace period too short"
        );

        let svc = find(&docs, "Service", "usher-worker");
        assert_eq!(
            s(svc, "spec.clusterIP"),
            "None",
            "{render}: worker Service is headless"
        );
        assert!(labels_match(
            at(svc, "spec.selector"),
            at(worker, "spec.template.metadata.labels")
        ));
        assert_eq!(
            container_port(c, at(seq(svc, "spec.ports")[0], "targetPort")),
            8000
        );

        let hpa = find(&docs, "HorizontalPodAutoscaler", "usher-worker");
        assert_eq!(s(hpa, "apiVersion"), "autoscaling/v2");
        assert_eq!(s(hpa, "spec.scaleTargetRef.kind"), "Deployment");
        assert_eq!(s(hpa, "spec.scaleTargetRef.name"), "usher-worker");
        assert!(
            int(hpa, "spec.minReplicas").unwrap_or(1) >= 2,
            "{render}: at least 2 workers"
        );
        assert!(int(hpa, "spec.maxReplicas").unwrap() > int(hpa, "spec.minReplicas").unwrap());
        assert!(
            seq(hpa, "spec.metrics")
                .iter()
                .any(|m| s(m, "type") == "Resource" && s(m, "resource.name") == "cpu"),
            "{render}: HPA scales on CPU"
        );
    }
}

#[test]
fn configmap_config_has_the_exact_keys_and_finds_the_workers() {
    let shape = key_tree(&serde_yaml::from_str(USHER_CONFIG_SHAPE).unwrap());
    for (render, docs) in renders() {
        let config = usher_config_of(&docs);
        assert_eq!(
            key_tree(&config),
            shape,
            "{render}: the ConfigMap's usher.yaml must have exactly the keys of the documented config"
        );
        let usher = the_container(find(&docs, "Deployment", "usher"));
        let listener = s(&config, "listeners.0.address");
        assert_eq!(listener, "0.0.0.0:8080", "{render}: public listener");
        assert_eq!(
            s(&config, "admin.address"),
            "0.0.0.0:9901",
            "{render}: admin listener"
        );
        assert_eq!(
            container_port(usher, &Yaml::from("http")).to_string(),
            listener.rsplit(':').next().unwrap()
        );

        // Each replica takes its share of the workers' threads: the share
        // must match the number of replicas, or together they overfill them.
        assert_eq!(
            int(&config, "upstreams.app.proxy_replicas"),
            int(find(&docs, "Deployment", "usher"), "spec.replicas"),
            "{render}: proxy_replicas must equal the usher Deployment's replicas"
        );

        // dns: must name the worker Service in the namespace it is deployed to.
        let worker_svc = find(&docs, "Service", "usher-worker");
        let namespace = s(worker_svc, "metadata.namespace");
        assert!(!namespace.is_empty(), "{render}: objects carry a namespace");
        assert_eq!(
            s(&config, "upstreams.app.dns.name"),
            format!("usher-worker.{namespace}.svc.cluster.local"),
            "{render}: dns.name must resolve the headless worker Service"
        );
        assert_eq!(
            int(&config, "upstreams.app.dns.port"),
            int(worker_svc, "spec.ports.0.port"),
            "{render}: dns port"
        );
        for d in docs.iter().filter(|d| s(d, "kind") != "Namespace") {
            assert_eq!(
                s(d, "metadata.namespace"),
                namespace,
                "{render}: {} in another namespace",
                s(d, "kind")
            );
        }
        assert_eq!(
            s(find(&docs, "Namespace", namespace), "metadata.name"),
            namespace
        );
        let routes = seq(&config, "routes");
        assert!(routes
            .iter()
            .all(|r| !at(&config, &format!("upstreams.{}", s(r, "upstream"))).is_null()));
    }
}

#[test]
fn network_policies_open_the_client_port_and_keep_admin_for_monitoring() {
    for (render, docs) in renders() {
        let np = find(&docs, "NetworkPolicy", "usher");
        let usher = find(&docs, "Deployment", "usher");
        assert!(labels_match(
            at(np, "spec.podSelector.matchLabels"),
            at(usher, "spec.template.metadata.labels")
        ));
        let types: Vec<&str> = seq(np, "spec.policyTypes")
            .iter()
            .filter_map(|t| t.as_str())
            .collect();
        assert!(
            types.contains(&"Ingress"),
            "{render}: the policy restricts ingress"
        );
        let rules = seq(np, "spec.ingress");
        let ports = |r: &Yaml| -> Vec<i64> {
            seq(r, "ports")
                .iter()
                .filter_map(|p| int(p, "port"))
                .collect()
        };
        assert!(
            rules
                .iter()
                .any(|r| at(r, "from").is_null() && ports(r) == [8080]),
            "{render}: port 8080 is open to everyone"
        );
        for r in &rules {
            if ports(r).contains(&9901) || ports(r).is_empty() {
                let from = seq(r, "from");
                assert!(
                    !from.is_empty(),
                    "{render}: the admin port must not be open to everyone"
                );
                for peer in from {
                    let ns =
                        peer["namespaceSelector"]["matchLabels"].get("kubernetes.io/metadata.name");
                    assert_eq!(
                        ns.and_then(|v| v.as_str()),
                        Some("monitoring"),
                        "{render}: admin only from monitoring"
                    );
                    assert!(peer.get("podSelector").is_none() && peer.get("ipBlock").is_none());
                }
            }
        }
        assert!(
            rules.iter().any(|r| ports(r) == [9901]),
            "{render}: metrics scrapes on 9901 are admitted"
        );
    }
}

// =============================================================== Prometheus Operator component

const PROMETHEUS_RULE_HEADER: &str = "\
# GENERATED from deploy/prometheus/rules.yaml: do not edit by hand. After
# changing rules.yaml, regenerate with
#   USHER_BLESS=1 cargo test -p usher-e2e --test deploy
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: usher
  labels:
    app.kubernetes.io/name: usher
spec:
";

/// The PrometheusRule text: rules.yaml without its leading comment, indented
/// under `spec:` (YAML block scalars are indentation-relative, so the rule
/// expressions stay byte-identical).
fn expected_prometheus_rule() -> String {
    let rules = std::fs::read_to_string(rules_path()).unwrap();
    let body: Vec<&str> = rules
        .lines()
        .skip_while(|l| l.starts_with('#') || l.trim().is_empty())
        .collect();
    let mut out = PROMETHEUS_RULE_HEADER.to_string();
    for line in body {
        if !line.trim().is_empty() {
            out.push_str("  ");
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

#[test]
fn prometheus_rule_carries_exactly_the_rules_file() {
    let path = kubernetes_dir().join("components/prometheus-operator/prometheusrule.yaml");
    let expected = expected_prometheus_rule();
    if std::env::var_os("USHER_BLESS").is_some() {
        std::fs::write(&path, &expected).unwrap();
    }
    let actual = std::fs::read_to_string(&path).unwrap();
    assert!(
        actual == expected,
        "{} is stale: run `USHER_BLESS=1 cargo test -p usher-e2e --test deploy`",
        path.display()
    );
    // And structurally, whatever the text: the groups are rules.yaml's groups.
    let rule = read_yaml(&path);
    assert!(
        rule["spec"]["groups"] == read_yaml(&rules_path())["groups"],
        "groups differ from rules.yaml"
    );
}

#[test]
fn operator_objects_are_well_formed() {
    let docs = kustomize(&kubernetes_dir().join("overlays/example"));
    let operator: Vec<&Yaml> = docs.iter().filter(|d| is_operator_object(d)).collect();
    let kinds: BTreeSet<&str> = operator.iter().map(|d| s(d, "kind")).collect();
    assert_eq!(kinds, BTreeSet::from(["PrometheusRule", "ServiceMonitor"]));
    let namespace = s(find(&docs, "Service", "usher"), "metadata.namespace");
    for d in &operator {
        let what = format!("{}/{}", s(d, "kind"), s(d, "metadata.name"));
        assert_eq!(s(d, "apiVersion"), "monitoring.coreos.com/v1", "{what}");
        assert!(!s(d, "metadata.name").is_empty(), "{what}: metadata.name");
        assert_eq!(s(d, "metadata.namespace"), namespace, "{what}: namespace");
        assert!(at(d, "spec").is_mapping(), "{what}: spec");
    }

    // ServiceMonitors: select a Service that has the scraped port; the job
    // label (from jobLabel) is what rules and dashboards expect.
    let mut jobs = BTreeSet::new();
    for sm in operator.iter().filter(|d| s(d, "kind") == "ServiceMonitor") {
        let name = s(sm, "metadata.name");
        let endpoints = seq(sm, "spec.endpoints");
        assert!(!endpoints.is_empty(), "ServiceMonitor {name}: endpoints");
        let services: Vec<&Yaml> = docs
            .iter()
            .filter(|d| {
                s(d, "kind") == "Service"
                    && labels_match(
                        at(sm, "spec.selector.matchLabels"),
                        at(d, "metadata.labels"),
                    )
            })
            .collect();
        assert_eq!(
            services.len(),
            1,
            "ServiceMonitor {name} must select exactly one Service"
        );
        let svc = services[0];
        for ep in endpoints {
            assert_eq!(s(ep, "path"), "/metrics");
            assert!(
                seq(svc, "spec.ports")
                    .iter()
                    .any(|p| s(p, "name") == s(ep, "port")),
                "ServiceMonitor {name}: Service {} has no port {}",
                s(svc, "metadata.name"),
                s(ep, "port")
            );
            duration_secs(s(ep, "interval"));
        }
        let job_label = s(sm, "spec.jobLabel");
        let job = svc["metadata"]["labels"]
            .get(job_label)
            .and_then(|v| v.as_str())
            .unwrap_or("");
        jobs.insert(job.to_string());
    }
    assert_eq!(
        jobs,
        BTreeSet::from(["usher".to_string(), "usher-worker".to_string()])
    );

    // PrometheusRule: every rule has the required fields and is rules.yaml's.
    let rule = operator
        .iter()
        .find(|d| s(d, "kind") == "PrometheusRule")
        .unwrap();
    let groups = seq(rule, "spec.groups");
    assert!(!groups.is_empty());
    for g in &groups {
        assert!(
            !s(g, "name").is_empty(),
            "PrometheusRule group without a name"
        );
        for r in seq(g, "rules") {
            assert!(!s(r, "expr").is_empty(), "rule without expr");
            assert!(
                at(r, "record").is_string() ^ at(r, "alert").is_string(),
                "each rule is either a record or an alert"
            );
        }
    }
    assert!(
        at(rule, "spec.groups") == &read_yaml(&rules_path())["groups"],
        "the rendered PrometheusRule's groups differ from rules.yaml's"
    );
}

// =============================================================== promtool

#[test]
fn promtool_check_rules() {
    run_ok(
        Command::new(promtool())
            .args(["check", "rules"])
            .arg(rules_path()),
    );
}

#[test]
fn promtool_test_rules() {
    let dir = deploy_dir().join("prometheus");
    let out = run_ok(
        Command::new(promtool())
            .args(["test", "rules", "rules_test.yaml"])
            .current_dir(&dir),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("SUCCESS"));
}

#[test]
fn rules_test_covers_every_alert_firing_and_not_firing() {
    let alerts: BTreeSet<String> = rules(&rules_path())
        .into_iter()
        .filter_map(|r| r.alert)
        .collect();
    let tests = read_yaml(&deploy_dir().join("prometheus/rules_test.yaml"));
    let mut firing = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for t in tests["tests"].as_sequence().unwrap() {
        for case in seq(t, "alert_rule_test") {
            let name = s(case, "alertname").to_string();
            if seq(case, "exp_alerts").is_empty() {
                silent.insert(name);
            } else {
                firing.insert(name);
            }
        }
    }
    assert_eq!(firing, alerts, "alerts tested FIRING");
    assert_eq!(silent, alerts, "alerts tested NOT firing");
}

#[test]
fn promtool_check_config() {
    for file in ["prometheus.yml", "prometheus-kubernetes.yml"] {
        let dir = deploy_dir().join("prometheus");
        run_ok(
            Command::new(promtool())
                .args(["check", "config", file])
                .current_dir(&dir),
        );
        // The job names are part of the contract with rules and dashboards.
        let cfg = read_yaml(&dir.join(file));
        let jobs: BTreeSet<&str> = seq(&cfg, "scrape_configs")
            .iter()
            .map(|j| s(j, "job_name"))
            .collect();
        assert_eq!(
            jobs,
            BTreeSet::from(["usher", "usher-worker"]),
            "{file}: job names"
        );
    }
}

// =============================================================== metrics contract

#[derive(Debug, Clone, PartialEq, Eq)]
struct ContractMetric {
    name: String,
    kind: String,
    labels: BTreeSet<String>,
}

/// The metrics contract of docs/DESIGN.md, pinned here: when the table there
/// changes, this list and deploy/ must change with it.
const PINNED_CONTRACT: &[(&str, &str, &[&str])] = &[
    (
        "usher_requests_total",
        "counter",
        &["route", "upstream", "code"],
    ),
    (
        "usher_request_duration_seconds",
        "histogram",
        &["route", "upstream"],
    ),
    ("usher_queue_depth", "gauge", &["upstream"]),
    ("usher_queue_wait_seconds", "histogram", &["upstream"]),
    (
        "usher_queue_rejections_total",
        "counter",
        &["upstream", "reason"],
    ),
    ("usher_backend_in_flight", "gauge", &["upstream", "backend"]),
    ("usher_backend_capacity", "gauge", &["upstream", "backend"]),
    ("usher_backend_up", "gauge", &["upstream", "backend"]),
    (
        "usher_backend_requests_total",
        "counter",
        &["upstream", "backend", "code"],
    ),
    (
        "usher_backend_response_seconds",
        "histogram",
        &["upstream", "backend"],
    ),
    (
        "usher_backend_ejections_total",
        "counter",
        &["upstream", "backend"],
    ),
    (
        "usher_health_checks_total",
        "counter",
        &["upstream", "backend", "result"],
    ),
    ("usher_retries_total", "counter", &["upstream", "reason"]),
    ("usher_client_connections", "gauge", &["listener"]),
    ("usher_config_reloads_total", "counter", &["result"]),
    ("usher_build_info", "gauge", &["version"]),
    (
        "usher_dns_resolutions_total",
        "counter",
        &["upstream", "result"],
    ),
    ("usher_fleet_restarts_total", "counter", &["upstream"]),
    (
        "usher_upgraded_connections",
        "gauge",
        &["upstream", "backend"],
    ),
    (
        "usher_health_check_failures_total",
        "counter",
        &["upstream", "backend", "reason"],
    ),
    ("usher_access_log_dropped_total", "counter", &[]),
    (
        "usher_backend_learned_capacity",
        "gauge",
        &["upstream", "backend"],
    ),
];

/// The worker's metrics (DESIGN.md names them in prose, without labels).
const WORKER_CONTRACT: &[(&str, &str, &[&str])] = &[
    ("usher_worker_threads", "gauge", &[]),
    ("usher_worker_busy_threads", "gauge", &[]),
    ("usher_worker_queue_depth", "gauge", &[]),
    ("usher_worker_requests_total", "counter", &["code"]),
];

/// Process metrics the Usher dashboard must show.
const REQUIRED_PROCESS_METRICS: &[&str] =
    &["process_cpu_seconds_total", "process_resident_memory_bytes"];

fn to_contract(list: &[(&str, &str, &[&str])]) -> Vec<ContractMetric> {
    list.iter()
        .map(|(n, k, l)| ContractMetric {
            name: n.to_string(),
            kind: k.to_string(),
            labels: l.iter().map(|s| s.to_string()).collect(),
        })
        .collect()
}

/// docs/DESIGN.md, which holds the metrics contract. Missing, it fails the
/// test: the cross-checks below have nothing to check against.
fn design_md() -> String {
    let path = repo_root().join("docs/DESIGN.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}): the metrics contract lives there",
            path.display()
        )
    })
}

/// Reads the "Metrics contract" table of DESIGN.md.
fn parse_contract(design: &str) -> (Vec<ContractMetric>, BTreeSet<String>) {
    let section = design
        .split("\n## ")
        .find(|s| s.starts_with("Metrics contract"))
        .expect("DESIGN.md has a `## Metrics contract` section");
    let backticked = |text: &str| -> Vec<String> {
        text.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    let mut table = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = cols[1].trim_matches('`').to_string();
        let kind = cols[2].split_whitespace().next().unwrap_or("").to_string();
        // `reason` (`full`, `timeout`): the parenthesised part lists values.
        let mut labels_col = String::new();
        let mut depth = 0;
        for ch in cols[3].chars() {
            match ch {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ if depth == 0 => labels_col.push(ch),
                _ => {}
            }
        }
        table.push(ContractMetric {
            name,
            kind,
            labels: backticked(&labels_col).into_iter().collect(),
        });
    }
    let worker: BTreeSet<String> = backticked(section)
        .into_iter()
        .filter(|n| n.starts_with("usher_worker_"))
        .collect();
    (table, worker)
}

/// The contract: DESIGN.md's table plus the worker metrics.
fn contract() -> Vec<ContractMetric> {
    let (mut list, worker) = parse_contract(&design_md());
    assert_eq!(
        list,
        to_contract(PINNED_CONTRACT),
        "DESIGN.md's metrics contract changed: update deploy/ and PINNED_CONTRACT together"
    );
    let ours: BTreeSet<String> = WORKER_CONTRACT.iter().map(|w| w.0.to_string()).collect();
    assert_eq!(worker, ours, "DESIGN.md's worker metrics changed");
    list.extend(to_contract(WORKER_CONTRACT));
    list
}

/// Maps a series name to its contract metric (`x_bucket` → `x` for histograms).
fn contract_name<'a>(contract: &'a [ContractMetric], series: &str) -> Option<&'a ContractMetric> {
    contract.iter().find(|m| {
        m.name == series
            || (m.kind == "histogram"
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| series == format!("{}{suffix}", m.name)))
    })
}

/// Every expression in deploy/: dashboards and all rules (alerts too).
fn every_deploy_expr() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = dashboard_paths()
        .iter()
        .flat_map(|p| dashboard_queries(p))
        .map(|q| (q.source, q.expr))
        .collect();
    for r in rules(&rules_path()) {
        let name = r.record.or(r.alert).unwrap_or_default();
        out.push((format!("rules.yaml: {name}"), r.expr));
    }
    out
}

#[test]
fn contract_parses_from_design_md() {
    let (table, worker) = parse_contract(&design_md());
    assert_eq!(table.len(), 22, "{table:#?}");
    assert_eq!(worker.len(), 4, "{worker:?}");
    let reasons = &table
        .iter()
        .find(|m| m.name == "usher_queue_rejections_total")
        .unwrap()
        .labels;
    assert_eq!(
        reasons,
        &BTreeSet::from(["upstream".to_string(), "reason".to_string()])
    );
}

#[test]
fn every_metric_used_in_deploy_is_in_the_contract() {
    let contract = contract();
    let recorded: BTreeSet<String> = rules(&rules_path())
        .into_iter()
        .filter_map(|r| r.record)
        .collect();
    let mut problems = Vec::new();
    for (source, expr) in every_deploy_expr() {
        let refs = promql_refs(&expr);
        if refs.metrics.is_empty() {
            problems.push(format!("{source}: no metric found in {expr:?}"));
        }
        for metric in &refs.metrics {
            let known = contract_name(&contract, metric);
            let ok = known.is_some()
                || recorded.contains(metric)
                || metric == "up"
                || metric.starts_with("process_");
            if !ok {
                problems.push(format!(
                    "{source}: `{metric}` is not in the metrics contract"
                ));
            }
            // Labels in selectors must be the metric's own (or the scrape's).
            if let Some(m) = known {
                for label in &refs.selector_labels[metric] {
                    let scrape = ["job", "instance", "le"].contains(&label.as_str());
                    if !m.labels.contains(label) && !scrape {
                        problems.push(format!(
                            "{source}: `{metric}` has no label `{label}` in the contract"
                        ));
                    }
                }
            }
        }
        // Grouping labels must exist on some metric of the expression.
        let mut available: BTreeSet<String> = ["job", "instance", "le"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for metric in &refs.metrics {
            if let Some(m) = contract_name(&contract, metric) {
                available.extend(m.labels.iter().cloned());
            } else if recorded.contains(metric) {
                available.extend(
                    ["route", "upstream", "code", "backend"]
                        .iter()
                        .map(|s| s.to_string()),
                );
            }
        }
        for label in &refs.grouping_labels {
            if !available.contains(label) {
                problems.push(format!(
                    "{source}: groups by `{label}`, which none of its metrics has"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "metric names outside the contract:\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_contract_metric_is_on_a_dashboard() {
    let contract = contract();
    let mut shown: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in dashboard_paths() {
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        for q in dashboard_queries(&path)
            .into_iter()
            .filter(|q| q.source.contains(": panel "))
        {
            for metric in promql_refs(&q.expr).metrics {
                let name = contract_name(&contract, &metric)
                    .map(|m| m.name.clone())
                    .unwrap_or(metric);
                shown.entry(name).or_default().insert(file.clone());
            }
        }
    }
    let mut missing = Vec::new();
    for m in &contract {
        let want = if m.name.starts_with("usher_worker_") {
            "usher-worker.json"
        } else {
            "usher.json"
        };
        if !shown.get(&m.name).is_some_and(|files| files.contains(want)) {
            missing.push(format!("{} (expected on {want})", m.name));
        }
    }
    for p in REQUIRED_PROCESS_METRICS {
        if !shown
            .get(*p)
            .is_some_and(|files| files.contains("usher.json"))
        {
            missing.push(format!("{p} (expected on usher.json)"));
        }
    }
    assert!(
        missing.is_empty(),
        "contract metrics on no dashboard panel:\n{}",
        missing.join("\n")
    );
}

#[test]
fn promql_lexer_finds_metrics_and_labels() {
    let r = promql_refs(
        r#"histogram_quantile(0.99, sum by (le, upstream) (rate(usher_queue_wait_seconds_bucket{upstream=~"a|b", job="usher"}[5m] offset 1m)))
           / on (upstream) group_left sum without (instance) (usher:foo:bar) > bool 0.5 or absent(up{job="x"}) unless count(process_open_fds)"#,
    );
    let metrics: Vec<&str> = r.metrics.iter().map(String::as_str).collect();
    assert_eq!(
        metrics,
        [
            "process_open_fds",
            "up",
            "usher:foo:bar",
            "usher_queue_wait_seconds_bucket"
        ]
    );
    assert_eq!(
        r.selector_labels["usher_queue_wait_seconds_bucket"],
        BTreeSet::from(["job".to_string(), "upstream".to_string()])
    );
    let grouping: Vec<&str> = r.grouping_labels.iter().map(String::as_str).collect();
    assert_eq!(grouping, ["instance", "le", "upstream"]);
    assert_eq!(
        deploy::substitute_grafana_vars(
            r#"rate(x{a=~"$upstream", b=~"${backend:regex}"}[$__rate_interval])"#
        ),
        r#"rate(x{a=~".*", b=~".*"}[1m])"#
    );
}

// =============================================================== dashboards

#[test]
fn dashboards_are_importable() {
    for path in dashboard_paths() {
        let file = path.file_name().unwrap().to_string_lossy().to_string();
        let d: Json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert!(
            !d["title"].as_str().unwrap_or("").is_empty(),
            "{file}: title"
        );
        assert!(
            !d["uid"].as_str().unwrap_or("").is_empty() && d["uid"].as_str().unwrap().len() <= 40,
            "{file}: uid"
        );
        let schema = d["schemaVersion"].as_i64().unwrap_or(0);
        assert!(
            (36..=41).contains(&schema),
            "{file}: schemaVersion {schema}"
        );
        assert!(
            d["id"].is_null(),
            "{file}: id must be null so that import creates the dashboard"
        );

        let vars = d["templating"]["list"].as_array().expect("templating.list");
        let ds = vars
            .iter()
            .find(|v| v["name"] == "datasource")
            .expect("a datasource variable");
        assert_eq!(ds["type"], "datasource", "{file}");
        assert_eq!(ds["query"], "prometheus", "{file}");
        let var_names: BTreeSet<&str> = vars.iter().filter_map(|v| v["name"].as_str()).collect();
        for v in vars.iter().filter(|v| v["type"] == "query") {
            assert_eq!(
                v["datasource"]["uid"], "${datasource}",
                "{file}: variable {}",
                v["name"]
            );
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap_or("");
            assert!(
                q.starts_with("label_values("),
                "{file}: variable {} uses label_values",
                v["name"]
            );
            assert_eq!(
                v["allValue"], ".*",
                "{file}: variable {} matches everything for All",
                v["name"]
            );
        }

        let panels = dashboard_panels(&d);
        let mut ids = BTreeSet::new();
        for p in &panels {
            let title = p["title"].as_str().unwrap_or("");
            assert!(
                ids.insert(p["id"].as_i64().expect("panel id")),
                "{file}: duplicate panel id"
            );
            let g = &p["gridPos"];
            let (x, w) = (g["x"].as_i64().unwrap(), g["w"].as_i64().unwrap());
            assert!(
                x >= 0 && w > 0 && x + w <= 24 && g["h"].as_i64().unwrap() > 0,
                "{file}: {title} gridPos"
            );
            if p["type"] == "row" {
                continue;
            }
            assert!(!title.is_empty(), "{file}: panel without a title");
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{file}: {title} uses the datasource variable"
            );
            let targets = p["targets"]
                .as_array()
                .filter(|t| !t.is_empty())
                .expect("targets");
            let mut refs = BTreeSet::new();
            for t in targets {
                assert!(
                    refs.insert(t["refId"].as_str().unwrap()),
                    "{file}: {title}: duplicate refId"
                );
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{file}: {title}");
                let expr = t["expr"].as_str().expect("expr");
                let bad = deploy::grafana_vars_outside_regex_matchers(expr);
                assert!(
                    bad.is_empty(),
                    "{file}: {title}: variables outside =~\"...\": {bad:?}"
                );
                for word in expr.split('$').skip(1) {
                    let name: String = word
                        .trim_start_matches('{')
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    assert!(
                        name.starts_with("__") || var_names.contains(name.as_str()),
                        "{file}: {title}: undefined variable ${name}"
                    );
                }
            }
        }
    }
}

#[test]
fn usher_dashboard_has_the_expected_panels() {
    let d: Json =
        serde_json::from_str(&std::fs::read_to_string(&dashboard_paths()[0]).unwrap()).unwrap();
    let vars: BTreeSet<&str> = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(vars.is_superset(&BTreeSet::from(["datasource", "upstream", "backend"])));
    let titles: Vec<String> = dashboard_panels(&d)
        .iter()
        .filter_map(|p| p["title"].as_str())
        .map(str::to_lowercase)
        .collect();
    for want in [
        "status code",
        "error ratio",
        "p50 / p90 / p99",
        "queue depth",
        "queue wait",
        "in-flight vs capacity",
        "saturation",
        "backend up",
        "ejections",
        "retries",
        "health checks",
        "health check failures",
        "upgraded connections",
        "dns resolutions",
        "fleet restarts",
        "client connections",
        "config reloads",
        "access log lines dropped",
        "build info",
        "cpu",
        "memory",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(want)),
            "usher.json: no panel about {want:?}"
        );
    }
}

// =============================================================== Dockerfile

#[test]
fn dockerfile_is_multistage_nonroot_and_ships_both_binaries() {
    let text = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    // Join continuation lines, drop comments.
    let joined = text.replace("\\\n", " ");
    let instructions: Vec<(String, String)> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (op, rest) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            (op.to_ascii_uppercase(), rest.trim().to_string())
        })
        .collect();
    let froms: Vec<&String> = instructions
        .iter()
        .filter(|(op, _)| op == "FROM")
        .map(|(_, a)| a)
        .collect();
    assert!(froms.len() >= 2, "multi-stage build");
    assert!(
        froms[0].contains("rust:"),
        "builds on the official Rust image: {}",
        froms[0]
    );
    let last_stage = instructions
        .iter()
        .rposition(|(op, _)| op == "FROM")
        .unwrap();
    let runtime = &instructions[last_stage..];
    assert!(
        runtime[0].1.contains("distroless")
            || runtime[0].1.contains("debian") && runtime[0].1.contains("slim"),
        "runtime image is distroless or debian slim: {}",
        runtime[0].1
    );
    let get = |op: &str| {
        runtime
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, a)| a.as_str())
            .collect::<Vec<_>>()
    };
    let user = get("USER")
        .last()
        .copied()
        .expect("USER in the runtime stage")
        .to_string();
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "runs as non-root: {user}"
    );
    assert_eq!(get("STOPSIGNAL"), ["SIGTERM"]);
    let exposed: BTreeSet<&str> = get("EXPOSE")
        .iter()
        .flat_map(|a| a.split_whitespace())
        .collect();
    assert_eq!(exposed, BTreeSet::from(["8080", "9901"]));
    let copies = get("COPY").join(" ");
    assert!(
        copies.contains("usher") && copies.contains("usher-worker"),
        "ships both binaries: {copies}"
    );
    assert!(
        joined.contains("-p usher") && joined.contains("-p usher-worker"),
        "builds both packages"
    );
    assert!(
        get("ENTRYPOINT").iter().any(|e| e.contains("usher")),
        "ENTRYPOINT is usher"
    );

    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).unwrap();
    let entries: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    assert!(
        entries.contains("target") && entries.contains(".git"),
        ".dockerignore keeps target/ and .git out"
    );
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "proxy",
        "worker",
        "tests",
        "config",
    ] {
        assert!(
            !entries.contains(needed),
            ".dockerignore must not exclude {needed}"
        );
    }
}

// =============================================================== queries against a real Prometheus

/// Serves `render(seconds since start)` as `/metrics` on 127.0.0.1, forever
/// (the thread ends with the test process).
fn serve_metrics(render: fn(f64) -> String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let start = Instant::now();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body = render(start.elapsed().as_secs_f64());
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

const BUCKETS: &[(&str, f64)] = &[
    ("0.005", 0.1),
    ("0.01", 0.25),
    ("0.025", 0.4),
    ("0.05", 0.55),
    ("0.1", 0.7),
    ("0.25", 0.85),
    ("0.5", 0.93),
    ("1", 0.97),
    ("2.5", 0.99),
    ("5", 1.0),
    ("+Inf", 1.0),
];

fn histogram(out: &mut String, name: &str, labels: &str, count: f64) {
    use std::fmt::Write as _;
    for (le, share) in BUCKETS {
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels},le=\"{le}\"}} {}",
            (count * share).floor()
        );
    }
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", count * 0.08);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", count.floor());
}

/// What a busy Usher's /metrics looks like per the contract: two backends,
/// one route, traffic growing with time.
fn usher_exposition(t: f64) -> String {
    use std::fmt::Write as _;
    let n = (t * 50.0).floor();
    let mut o = String::new();
    o.push_str("# TYPE usher_requests_total counter\n");
    for (code, share) in [("200", 0.95), ("404", 0.03), ("503", 0.02)] {
        let _ = writeln!(
            o,
            "usher_requests_total{{route=\"default\",upstream=\"app\",code=\"{code}\"}} {}",
            (n * share).floor()
        );
    }
    o.push_str("# TYPE usher_request_duration_seconds histogram\n");
    histogram(
        &mut o,
        "usher_request_duration_seconds",
        "route=\"default\",upstream=\"app\"",
        n,
    );
    o.push_str("# TYPE usher_queue_depth gauge\nusher_queue_depth{upstream=\"app\"} 3\n");
    o.push_str("# TYPE usher_queue_wait_seconds histogram\n");
    histogram(&mut o, "usher_queue_wait_seconds", "upstream=\"app\"", n);
    o.push_str("# TYPE usher_queue_rejections_total counter\n");
    let _ = writeln!(
        o,
        "usher_queue_rejections_total{{upstream=\"app\",reason=\"full\"}} {}",
        (n * 0.01).floor()
    );
    let _ = writeln!(
        o,
        "usher_queue_rejections_total{{upstream=\"app\",reason=\"timeout\"}} {}",
        (n * 0.01).floor()
    );
    for (i, backend) in ["10.0.0.1:8000", "10.0.0.2:8000"].iter().enumerate() {
        let l = format!("upstream=\"app\",backend=\"{backend}\"");
        let _ = writeln!(o, "usher_backend_in_flight{{{l}}} {}", 3 - i);
        let _ = writeln!(o, "usher_backend_capacity{{{l}}} 4");
        let _ = writeln!(o, "usher_backend_learned_capacity{{{l}}} {}", 4 - 3 * i);
        let _ = writeln!(o, "usher_backend_up{{{l}}} 1");
        let _ = writeln!(
            o,
            "usher_backend_requests_total{{{l},code=\"200\"}} {}",
            (n * 0.45).floor()
        );
        let _ = writeln!(
            o,
            "usher_backend_requests_total{{{l},code=\"500\"}} {}",
            (n * 0.01).floor()
        );
        histogram(&mut o, "usher_backend_response_seconds", &l, n / 2.0);
        let _ = writeln!(
            o,
            "usher_backend_ejections_total{{{l}}} {}",
            (t / 10.0).floor()
        );
        let _ = writeln!(
            o,
            "usher_health_checks_total{{{l},result=\"success\"}} {}",
            (t * 0.5).floor()
        );
        let _ = writeln!(o, "usher_health_checks_total{{{l},result=\"failure\"}} 1");
        for reason in ["status", "timeout", "refused", "error", "body"] {
            let _ = writeln!(
                o,
                "usher_health_check_failures_total{{{l},reason=\"{reason}\"}} {}",
                u8::from(reason == "timeout")
            );
        }
        let _ = writeln!(o, "usher_upgraded_connections{{{l}}} {i}");
    }
    let _ = writeln!(
        o,
        "usher_dns_resolutions_total{{upstream=\"app\",result=\"success\"}} {}",
        (t / 5.0).floor()
    );
    o.push_str("usher_dns_resolutions_total{upstream=\"app\",result=\"failure\"} 1\n");
    o.push_str("usher_fleet_restarts_total{upstream=\"app\"} 1\n");
    o.push_str("usher_access_log_dropped_total 0\n");
    let _ = writeln!(
        o,
        "usher_retries_total{{upstream=\"app\",reason=\"connect\"}} {}",
        (n * 0.005).floor()
    );
    o.push_str("usher_client_connections{listener=\"public\"} 12\n");
    o.push_str("usher_config_reloads_total{result=\"success\"} 2\nusher_config_reloads_total{result=\"failure\"} 1\n");
    o.push_str("usher_build_info{version=\"0.1.0\"} 1\n");
    let _ = writeln!(o, "process_cpu_seconds_total {}", t * 0.2);
    o.push_str(
        "process_resident_memory_bytes 52428800\nprocess_open_fds 40\nprocess_max_fds 1048576\n",
    );
    o
}

/// What a busy usher-worker's /metrics looks like.
fn worker_exposition(t: f64) -> String {
    let n = (t * 20.0).floor();
    format!(
        "usher_worker_threads 4\nusher_worker_busy_threads 3\nusher_worker_queue_depth 0\n\
         usher_worker_requests_total{{code=\"200\"}} {n}\nusher_worker_requests_total{{code=\"503\"}} {}\n",
        (n * 0.01).floor()
    )
}

/// Runs every dashboard query and every recording rule through a real
/// Prometheus scraping exporters that publish the contract's metrics: catches
/// PromQL that does not parse, label mismatches, and joins that match nothing.
#[test]
fn every_dashboard_and_rule_query_returns_data_from_contract_metrics() {
    let usher = serve_metrics(usher_exposition);
    let worker = serve_metrics(worker_exposition);
    let prom = Prometheus::start(&[
        ScrapeJob::new("usher", [usher]),
        ScrapeJob::new("usher-worker", [worker]),
    ]);
    prom.wait_for_targets_up(Duration::from_secs(30));
    assert_queries_return_data(
        &prom,
        &deploy::all_deploy_queries(),
        Duration::from_secs(60),
    );
    // A wrong name must come back empty (the check above is not vacuous).
    assert_eq!(prom.query("usher_no_such_metric").unwrap().len(), 0);
}

/// The worker dashboard against the real `usher-worker` binary.
#[test]
fn worker_dashboard_queries_return_data_from_a_real_worker() {
    let (_worker, addr) = spawn_worker(["--threads", "2"]);
    let metrics = blocking::get(&url(addr, "/metrics")).expect("GET /metrics of usher-worker");
    assert!(
        metrics.status == StatusCode::OK && metrics.text().contains("usher_worker_threads"),
        "usher-worker serves no usher_worker_* metrics: {} {}",
        metrics.status,
        metrics.text()
    );
    for path in [
        "/healthz",
        "/echo",
        "/sleep?ms=1",
        "/status/503",
        "/status/200",
    ] {
        blocking::get(&url(addr, path))
            .unwrap_or_else(|e| panic!("usher-worker did not answer {path}: {e:#}"));
    }
    let prom = Prometheus::start(&[ScrapeJob::new("usher-worker", [addr.to_string()])]);
    prom.wait_for_targets_up(Duration::from_secs(30));
    let queries = dashboard_queries(&deploy_dir().join("grafana/usher-worker.json"));
    assert_queries_return_data(&prom, &queries, Duration::from_secs(30));
}

// =============================================================== live Usher

/// Name of the DNS-discovered upstream's workers in the live test.
const DNS_NAME: &str = "workers.deploy.test";

/// A real DNS server (dnsmasq) on a loopback port answering `DNS_NAME` with
/// `ip`, as the headless worker Service would in Kubernetes. Killed on drop.
fn start_dnsmasq(dir: &Path, ip: std::net::IpAddr) -> (usher_e2e::Proc, SocketAddr) {
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, format!("{ip} {DNS_NAME}\n")).unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], usher_e2e::free_port()));
    let dnsmasq = usher_e2e::dns::start_dnsmasq(dir, addr.port());
    (dnsmasq, addr)
}

#[test]
fn live_usher_feeds_every_dashboard_panel_and_rule() {
    // Usher with a fleet of 2 workers x 2 threads, plus a backend that accepts
    // health checks but drops every request (retries, ejections), and a
    // second upstream found through real DNS (usher_dns_resolutions_total).
    let flaky = serve_flaky_backend();
    let (_dns_worker, dns_backend) = spawn_worker(["--threads", "2"]);
    let dns_dir = TempDir::new("deploy-dns");
    let (_dnsmasq, resolver) = start_dnsmasq(dns_dir.path(), dns_backend.ip());
    let discovered = format!(
        r#"    dns: {{ name: {DNS_NAME}, port: {port}, refresh: 500ms, resolver: "{resolver}" }}
    health_check: {{ path: /healthz, interval: 200ms, timeout: 100ms, rise: 1, fall: 2 }}"#,
        port = dns_backend.port(),
    );
    let upstream = format!(
        r#"    fleet:
      command: ["{worker}", --threads, "2", --listen, "127.0.0.1:{{port}}"]
      processes: 2
      base_port: 0
{backends}
    queue: {{ max_depth: 2, timeout: 100ms }}
    health_check: {{ path: /healthz, interval: 200ms, timeout: 100ms, rise: 1, fall: 2 }}
    outlier: {{ consecutive_failures: 2, base_ejection: 1s }}
    retries: {{ attempts: 2 }}
    timeouts: {{ connect: 200ms, response: 5s }}"#,
        worker = bin_path("usher-worker").display(),
        backends = backends(&[flaky], ""),
    );
    let config = Config::new()
        .route("*", "app")
        .route("dns.deploy.test", "discovered")
        .upstream("app", &upstream)
        .upstream("discovered", &discovered)
        .top(r#"access_log: { format: "off" }"#)
        .yaml();
    let mut usher = Usher::start_ready(&config);
    assert!(
        wait_until(Duration::from_secs(20), || usher.fleet_processes().len()
            >= 2),
        "usher did not start its 2 fleet processes:\n{}",
        usher.proc.output()
    );
    let found = || {
        usher.status()["upstreams"]["discovered"]["backends"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b["address"] == dns_backend.to_string()))
    };
    assert!(
        wait_until(Duration::from_secs(10), found),
        "usher did not find {DNS_NAME} through dnsmasq:\n{}",
        usher.proc.output()
    );
    let mut workers: Vec<String> = usher
        .fleet_processes()
        .iter()
        .take(2)
        .map(|(addr, _)| addr.to_string())
        .collect();
    workers.push(dns_backend.to_string());

    let prom_check = std::thread::spawn({
        let admin = usher.admin.to_string();
        move || deploy::check_live_deploy_queries(&admin, &workers)
    });
    drive_traffic(&usher, &concrete(&config), &prom_check);
    prom_check.join().expect("every query returned data");
    usher.proc.term();
    assert!(
        usher.proc.wait_exit(Duration::from_secs(15)).is_some(),
        "usher did not exit on SIGTERM"
    );

    // The shipped Kubernetes configs must pass `usher check` (dns: discovery).
    for (render, docs) in renders() {
        let dir = TempDir::new("check");
        let file = dir.path().join("usher.yaml");
        let cm = find(&docs, "ConfigMap", "usher-config");
        std::fs::write(&file, cm["data"]["usher.yaml"].as_str().unwrap()).unwrap();
        let out = Command::new(bin_path("usher"))
            .arg("check")
            .arg("-c")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{render}: usher check: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Traffic that makes every contract metric exist: successes, 5xx, a burst
/// that overflows and times out the queue, and a bad then a good reload; then
/// steady traffic until `check` is done (or gave up).
fn drive_traffic(usher: &Usher, good_config: &str, check: &std::thread::JoinHandle<()>) {
    let get = |path: &str| blocking::get_within(&usher.url(path), Duration::from_secs(10));
    for _ in 0..20 {
        for path in ["/echo", "/sleep?ms=5", "/status/500", "/status/404"] {
            let _ = get(path);
        }
    }
    let burst: Vec<_> = (0..24)
        .map(|_| {
            let url = usher.url("/sleep?ms=400");
            std::thread::spawn(move || blocking::get_within(&url, Duration::from_secs(10)))
        })
        .collect();
    for b in burst {
        let _ = b.join();
    }
    let failed_reloads = || usher.metric("usher_config_reloads_total", &[("result", "failure")]);
    replace_file(&usher.config_path, "listeners: [\n");
    assert!(
        wait_until(Duration::from_secs(10), || failed_reloads() >= 1.0),
        "usher did not count the broken config as a failed reload:\n{}",
        usher.proc.output()
    );
    replace_file(&usher.config_path, good_config);
    // Keep traffic flowing while the checks run (they give up after 90 s).
    let until = Instant::now() + Duration::from_secs(120);
    while !check.is_finished() && Instant::now() < until {
        let _ = get("/sleep?ms=20");
        let _ = get("/status/503");
    }
}

/// A backend that answers /healthz and resets every other request.
fn serve_flaky_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 2048];
            let n = stream.read(&mut buf).unwrap_or(0);
            if buf[..n].starts_with(b"GET /healthz") {
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            }
        }
    });
    addr
}
