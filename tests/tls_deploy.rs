//! The Kubernetes TLS overlays agree with the daemon: the variables they set are the config fields
//! `tls_cert`, `tls_key` and `tls_client_ca`, their paths are where the volumes are mounted, and no
//! probe speaks gRPC to a port that now speaks TLS. (.ci/kubernetes.sh renders and validates them.)
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use batchd::config::{Config, Flags};

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `(name, value)` of every `- name: X` / `value: Y` pair of a manifest.
fn env_vars(manifest: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = manifest.lines().map(str::trim).collect();
    lines
        .windows(2)
        .filter_map(|w| {
            let name = w[0].strip_prefix("- name: ")?;
            let value = w[1].strip_prefix("value: ")?;
            Some((name.to_owned(), value.to_owned()))
        })
        .collect()
}

/// The `mountPath:` values of a manifest.
fn mounts(manifest: &str) -> Vec<String> {
    manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("mountPath: "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_overlays_set_the_tls_fields_where_the_volumes_are() {
    let tls = read("deploy/kubernetes-overlays/tls/deployment.yaml");
    let mtls = read("deploy/kubernetes-overlays/mtls/deployment.yaml");
    let env: Vec<(String, String)> = env_vars(&tls).into_iter().chain(env_vars(&mtls)).collect();
    assert_eq!(env.len(), 3, "{env:?}");
    let config = Config::load(&Flags::default(), env.clone()).unwrap();
    assert_eq!(config.tls_cert, PathBuf::from("/etc/batchd/tls/tls.crt"));
    assert_eq!(config.tls_key, PathBuf::from("/etc/batchd/tls/tls.key"));
    assert_eq!(
        config.tls_client_ca,
        PathBuf::from("/etc/batchd/client-ca/clients.crt")
    );
    assert!(config.mtls_enabled());
    let mounted: Vec<String> = mounts(&tls).into_iter().chain(mounts(&mtls)).collect();
    for (name, value) in &env {
        let dir = Path::new(value).parent().unwrap().to_str().unwrap();
        assert!(
            mounted.iter().any(|m| m == dir),
            "{name}={value}: nothing is mounted at {dir} ({mounted:?})"
        );
    }
}

#[test]
fn with_tls_the_probes_use_the_admin_listener() {
    let kustomization = read("deploy/kubernetes-overlays/tls/kustomization.yaml");
    for probe in ["startupProbe", "readinessProbe"] {
        let at = kustomization
            .find(&format!("path: /spec/template/spec/containers/0/{probe}"))
            .unwrap_or_else(|| panic!("the tls overlay does not replace the {probe}"));
        let rest = &kustomization[at..];
        let body = &rest[..rest.find("- op:").unwrap_or(rest.len())];
        assert!(body.contains("path: /readyz"), "{probe}: {body}");
        assert!(body.contains("port: admin"), "{probe}: {body}");
        assert!(!body.contains("grpc:"), "{probe}: {body}");
    }
    // The base's liveness probe already uses the admin listener.
    let base = read("deploy/kubernetes/deployment.yaml");
    let liveness = &base[base.find("livenessProbe:").unwrap()..];
    assert!(liveness[..200].contains("path: /healthz"));
}
