//! Reading samples out of a Prometheus text scrape of the admin `/metrics` endpoint.

use std::net::SocketAddr;

/// One scrape of `/metrics` on the admin listener at `admin`; panics unless it answers 200.
pub fn scrape(admin: SocketAddr) -> String {
    let (code, body) = super::http_get(admin, "/metrics");
    assert_eq!(code, 200, "GET /metrics: {body}");
    body
}

/// One sample of `name` with exactly these labels (`""` for none) from a scrape.
pub fn sample(metrics: &str, name: &str, labels: &str) -> f64 {
    let key = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    let line = metrics
        .lines()
        .find(|l| l.starts_with(&key))
        .unwrap_or_else(|| panic!("no {key:?} in\n{metrics}"));
    line[key.len()..].trim().parse().unwrap()
}

/// The sum of every sample of `name` whatever its labels (e.g. `sum(batchd_jobs_running)`).
pub fn sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}
