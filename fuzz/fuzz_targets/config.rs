//! Config parsing and validation: TOML text → `Config::from_toml` (the path `Config::load` takes
//! for a config file: parse, deserialize with `[[exec]]` and `[[principal]]` tables, `validate()`)
//! → what `batchd` does next before it binds (exec handlers registered, principals checked against
//! the handlers and installed in an engine).
//!
//! Properties:
//! - Accepted or refused, never a panic; a refusal has a message.
//! - An accepted config validates again, and survives a round trip through TOML unchanged
//!   (serialize → `from_toml` → equal).
//! - Everything that start-up does with an accepted config succeeds: each exec spec compiles and
//!   registers (isolation forced to process groups: the fuzzer makes no cgroups), principals name
//!   known handlers and install, the engine's limits build.
#![no_main]

use batchd::engine::Limits;
use batchd::handlers::exec;
use batchd::handlers::exec::IsolationSetting;
use batchd::{Config, Engine, Registry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        run(text);
    }
});

fn run(text: &str) {
    let config = match Config::from_toml(text) {
        Ok(c) => c,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    config
        .validate()
        .expect("an accepted config validates again");

    let written = toml::to_string(&config).expect("an accepted config serializes");
    let again = Config::from_toml(&written)
        .unwrap_or_else(|e| panic!("written back, the config is refused: {e}\n{written}"));
    assert_eq!(again, config, "TOML round trip\n{written}");

    let mut registry = Registry::builtin();
    let specs: Vec<_> = config
        .exec
        .iter()
        .cloned()
        .map(|mut s| {
            s.compile().expect("a validated spec compiles");
            // Without cgroups here: what needs one (limits) goes with them.
            s.isolation = IsolationSetting::ProcessGroup;
            s.memory_max = None;
            s.pids_max = None;
            s
        })
        .collect();
    exec::register(&mut registry, &specs).expect("validated exec specs register");
    let known = |h: &str| registry.get(h).is_some();
    match batchd::auth::check_handlers(&config.principal, known) {
        Ok(()) => {
            let engine = Engine::new(Limits::from(&config), registry);
            let n = engine
                .set_principals(&config.principal, config.reflection_open)
                .expect("validated principals install");
            assert_eq!(n, config.principal.len());
        }
        // A handler no registry has is start-up's error to give (exit 64), not a panic.
        Err(e) => assert!(e.to_string().contains("handlers")),
    }
}
