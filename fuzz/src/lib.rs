//! What batchd's fuzz targets share: one daemon set up as `batchd` sets itself up (config text →
//! [`Config::from_toml`] → exec handlers registered → principals checked and installed), with
//! limits small enough that fuzz inputs reach them, and the tokens of its principals.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use batchd::auth::Credentials;
use batchd::engine::{Limits, Principal};
use batchd::handlers::exec;
use batchd::handlers::exec::{ExecSpec, Template};
use batchd::{Config, Engine, Registry};
use sha2::{Digest, Sha256};

/// The bearer token of principal `alice` (handlers `echo` and `resize`).
pub const ALICE_TOKEN: &str = "alice-secret-token";
/// The two tokens of principal `bob` (every handler), as during a rotation.
pub const BOB_TOKENS: [&str; 2] = ["bob-old-token", "bob-new-token"];
/// Longest REJECTED message admission may give, whatever the job holds: client strings in it are
/// cut short ([`batchd::handlers::quote`]), so a hostile job cannot blow up its result.
pub const MAX_REASON: usize = 2048;

/// The fuzzed daemon: its config, engines (with principals, and an anonymous one) and the
/// templates of its exec handlers.
pub struct Daemon {
    /// The config the daemon runs with.
    pub config: Config,
    /// The engine with the config's principals in force.
    pub engine: Engine,
    /// The same daemon without principals: every call anonymous.
    pub anonymous: Engine,
    /// Each exec handler's spec and compiled template, by name.
    pub exec: HashMap<String, (ExecSpec, Template)>,
}

/// Lowercase hex SHA-256 of `bytes`, as `token_sha256` wants it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The daemon's config file.
pub fn daemon_toml() -> String {
    format!(
        r#"
max_message_size = "1KiB"
max_payload = "512B"
max_jobs_per_batch = 16
default_job_timeout = "5s"
max_job_timeout = "1m"

[[exec]]
name = "resize"
command = ["convert", "{{input}}", "-resize", "{{size}}", "{{{{size}}}}", "--", "{{output}}"]
params = {{ input = '[a-z0-9_]{{1,32}}\.png', size = '[0-9]{{1,4}}x[0-9]{{1,4}}', output = '[a-z0-9_/]{{1,32}}\.(png|jpg)' }}
timeout = "30s"
isolation = "process-group"

[[exec]]
name = "grep"
command = ["grep", "-c", "-e", "{{pattern}}"]
params = {{ pattern = '[^-].{{0,63}}' }}
isolation = "process-group"

[[principal]]
name = "alice"
token_sha256 = "{alice}"
handlers = ["echo", "resize"]
max_calls = 4

[[principal]]
name = "bob"
token_sha256 = ["{bob0}", "{bob1}"]
client_cert = "DNS:bob.example"

[[principal]]
name = "carol"
client_cert = "CN=carol"
handlers = ["sha256"]
"#,
        alice = sha256_hex(ALICE_TOKEN.as_bytes()),
        bob0 = sha256_hex(BOB_TOKENS[0].as_bytes()),
        bob1 = sha256_hex(BOB_TOKENS[1].as_bytes()).to_uppercase(),
    )
}

/// The daemon, set up once per process.
pub fn daemon() -> &'static Daemon {
    static DAEMON: OnceLock<Daemon> = OnceLock::new();
    DAEMON.get_or_init(|| {
        let config = Config::from_toml(&daemon_toml()).expect("the fuzz daemon's config is valid");
        let mut registry = Registry::builtin();
        exec::register(&mut registry, &config.exec).expect("its exec handlers register");
        batchd::auth::check_handlers(&config.principal, |h| registry.get(h).is_some())
            .expect("its principals name known handlers");
        let limits = Limits::from(&config);
        let engine = Engine::new(limits.clone(), registry.clone());
        engine
            .set_principals(&config.principal, config.reflection_open)
            .expect("its principals install");
        let anonymous = Engine::new(limits, registry);
        let exec = config
            .exec
            .iter()
            .map(|s| {
                let template = s.compile().expect("its exec specs compile");
                (s.name.clone(), (s.clone(), template))
            })
            .collect();
        Daemon {
            config,
            engine,
            anonymous,
            exec,
        }
    })
}

/// The principal a bearer token proves on `engine`, or `None`.
pub fn principal_of(engine: &Engine, token: &str) -> Option<Arc<Principal>> {
    let value = format!("Bearer {token}");
    engine
        .authenticate(&Credentials::new(Some(value.as_bytes()), None))
        .ok()
}
