//! Which scenarios a run asks for: every word of argv that is not a flag.

/// The scenarios named on the command line, checked against the ones a bench knows.
pub struct Scenarios {
    chosen: Vec<String>,
}

impl Scenarios {
    /// Reads argv: `cargo bench` passes `--bench`; every other word names a scenario. Panics on a
    /// name that is not in `known`.
    pub fn from_args(known: &[&str]) -> Self {
        let chosen: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| !a.starts_with('-'))
            .collect();
        for c in &chosen {
            assert!(
                known.contains(&c.as_str()),
                "unknown scenario {c:?}; known: {known:?}"
            );
        }
        Self { chosen }
    }

    /// `name` runs: it was named, or nothing was.
    pub fn run(&self, name: &str) -> bool {
        self.chosen.is_empty() || self.chosen.iter().any(|c| c == name)
    }
}

/// A number from the environment variable `key`, or `default` when it is unset or not a number.
pub fn knob<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
