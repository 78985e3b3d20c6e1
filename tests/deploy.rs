//! The deployment files agree with the daemon: its ports (unit, image, manifests, dashboard,
//! README), the config the pods get, and stop timeouts long enough for a full drain.
//! (.ci/systemd.sh, .ci/container.sh and .ci/kubernetes.sh run the files themselves.)
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use batchd::config::{Config, Flags, DEFAULT_ADMIN_PORT, DEFAULT_GRPC_PORT};
use batchd::server::CLOSE_TIMEOUT;

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn assert_has(path: &str, text: &str, needle: &str) {
    assert!(text.contains(needle), "{path} does not say {needle:?}");
}

/// The value of `key=` in a unit file.
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}="))
        .trim()
        .to_owned()
}

/// The exec handlers' default `kill_grace` (README "Exec handlers").
const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(2);

/// How long a daemon with `config` may take from SIGTERM to exit: the grace, the last results,
/// the exec process groups (default kill_grace + 1 s) and the trace flush.
fn drain(config: &Config) -> Duration {
    config.shutdown_grace
        + CLOSE_TIMEOUT
        + DEFAULT_KILL_GRACE
        + Duration::from_secs(1)
        + config.trace_flush_timeout
}

fn kubernetes_config() -> Config {
    let flags = Flags {
        config: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/batchd.toml")),
        ..Flags::default()
    };
    Config::load(&flags, std::iter::empty()).unwrap()
}

#[test]
fn the_ports_agree_everywhere() {
    let defaults = Config::default();
    assert_eq!(defaults.listen.port(), DEFAULT_GRPC_PORT);
    assert_eq!(defaults.admin_listen.port(), DEFAULT_ADMIN_PORT);
    let (grpc, admin) = (DEFAULT_GRPC_PORT, DEFAULT_ADMIN_PORT);
    // Not Prometheus's own port, nor in the range it gives exporters.
    assert!(!(9090..=9999).contains(&admin));

    let socket = read("deploy/systemd/batchd.socket");
    assert_eq!(
        unit_value(&socket, "ListenStream"),
        format!("127.0.0.1:{grpc}")
    );

    let path = "deploy/container/Dockerfile";
    let docker = read(path);
    assert_has(path, &docker, &format!("EXPOSE {grpc} {admin}"));
    assert_has(path, &docker, &format!("BATCHD_LISTEN=0.0.0.0:{grpc}"));
    assert_has(
        path,
        &docker,
        &format!("BATCHD_ADMIN_LISTEN=0.0.0.0:{admin}"),
    );

    let path = "deploy/kubernetes/deployment.yaml";
    let deployment = read(path);
    assert_has(path, &deployment, &format!("containerPort: {grpc}"));
    assert_has(path, &deployment, &format!("containerPort: {admin}"));
    assert_has(
        path,
        &deployment,
        &format!("prometheus.io/port: \"{admin}\""),
    );
    assert_has(
        path,
        &deployment,
        &format!("grpc:\n              port: {grpc}"),
    );
    let path = "deploy/kubernetes/service.yaml";
    assert_has(path, &read(path), &format!("port: {grpc}"));
    let pods = kubernetes_config();
    assert_eq!(pods.listen.port(), grpc);
    assert_eq!(pods.admin_listen.port(), admin);

    let path = "deploy/grafana-dashboard.json";
    assert_has(path, &read(path), &format!("port {admin}"));
    let readme = read("README.md");
    assert_has("README.md", &readme, &format!("127.0.0.1:{admin}"));

    for path in [
        "README.md",
        "deploy/batchd.toml",
        "deploy/grafana-dashboard.json",
        "deploy/systemd/batchd.service",
        "deploy/systemd/batchd.socket",
        "deploy/container/Dockerfile",
        "deploy/kubernetes/deployment.yaml",
        "deploy/kubernetes/batchd.toml",
    ] {
        assert!(
            !read(path).contains(":9090"),
            "{path} still names port 9090"
        );
    }
}

#[test]
fn the_unit_is_notify_with_a_watchdog_and_stops_after_a_full_drain() {
    let unit = read("deploy/systemd/batchd.service");
    assert_eq!(unit_value(&unit, "Type"), "notify");
    assert_eq!(unit_value(&unit, "NotifyAccess"), "main");
    assert_eq!(unit_value(&unit, "KillMode"), "control-group");
    let watchdog = humantime::parse_duration(&unit_value(&unit, "WatchdogSec")).unwrap();
    // The watchdog must outlast the engine's own stall timeout, or a busy moment would kill it.
    assert!(watchdog >= Config::default().stall_timeout);
    let stop = humantime::parse_duration(&unit_value(&unit, "TimeoutStopSec")).unwrap();
    let need = drain(&Config::default());
    assert!(stop > need, "TimeoutStopSec {stop:?}, drain up to {need:?}");
}

#[test]
fn pods_and_containers_get_time_for_a_full_drain() {
    let deployment = read("deploy/kubernetes/deployment.yaml");
    let grace: u64 = deployment
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pre_stop: u64 = deployment
        .split("preStop:")
        .nth(1)
        .and_then(|rest| rest.split("seconds:").nth(1))
        .and_then(|rest| rest.lines().next())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let need = drain(&kubernetes_config()) + Duration::from_secs(pre_stop);
    assert!(
        Duration::from_secs(grace) >= need,
        "terminationGracePeriodSeconds {grace}, preStop + drain up to {need:?}"
    );

    // The documented `--stop-timeout` of docker/podman run.
    for path in ["deploy/container/Dockerfile", "README.md"] {
        let text = read(path);
        let timeout: u64 = text
            .split("--stop-timeout ")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .unwrap_or_else(|| panic!("{path} gives no --stop-timeout"))
            .parse()
            .unwrap();
        let need = drain(&Config::default());
        assert!(
            Duration::from_secs(timeout) > need,
            "{path}: --stop-timeout {timeout}, drain up to {need:?}"
        );
    }
}
