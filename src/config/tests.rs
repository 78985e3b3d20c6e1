use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

#[test]
fn defaults_load_and_validate() {
    let c = Config::load(&Flags::default(), env(&[])).unwrap();
    assert_eq!(c, Config::default());
}

#[test]
fn flag_beats_env_beats_file_beats_default() {
    let f = file("workers = 3\nsession_window = 7\nmax_calls = 5\n");
    let flags = Flags {
        config: Some(f.path().to_owned()),
        workers: Some(1),
        ..Flags::default()
    };
    let vars = env(&[("BATCHD_WORKERS", "2"), ("BATCHD_SESSION_WINDOW", "8")]);
    let c = Config::load(&flags, vars).unwrap();
    assert_eq!(c.workers, 1, "flag wins");
    assert_eq!(c.session_window, 8, "env beats file");
    assert_eq!(c.max_calls, 5, "file beats default");
    assert_eq!(
        c.max_payload,
        Config::default().max_payload,
        "default stays"
    );
}

#[test]
fn set_flag_and_units() {
    let flags = Flags {
        set: vec!["shutdown_grace=2s".into(), "max_output = 1MiB".into()],
        ..Flags::default()
    };
    let c = Config::load(&flags, env(&[("BATCHD_DEFAULT_JOB_TIMEOUT", "90")])).unwrap();
    assert_eq!(c.shutdown_grace, Duration::from_secs(2));
    assert_eq!(c.max_output, ByteSize::mib(1));
    assert_eq!(c.default_job_timeout, Duration::from_secs(90));
}

#[test]
fn unrelated_env_is_ignored() {
    let c = Config::load(
        &Flags::default(),
        env(&[("BATCHD_ENDPOINT", "x"), ("HOME", "/")]),
    );
    assert!(c.is_ok());
}

#[test]
fn errors_name_the_field_and_origin() {
    let e = Config::load(&Flags::default(), env(&[("BATCHD_WORKERS", "many")])).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("BATCHD_WORKERS") && msg.contains("workers"),
        "{msg}"
    );

    let f = file("wrokers = 3\n");
    let flags = Flags {
        config: Some(f.path().to_owned()),
        ..Flags::default()
    };
    let msg = Config::load(&flags, env(&[])).unwrap_err().to_string();
    assert!(
        msg.contains("wrokers") && msg.contains("config file"),
        "{msg}"
    );

    let flags = Flags {
        workers: Some(0),
        ..Flags::default()
    };
    let msg = Config::load(&flags, env(&[])).unwrap_err().to_string();
    assert!(msg.contains("workers: must be at least 1"), "{msg}");

    let flags = Flags {
        set: vec!["max_payload=1GiB".into()],
        ..Flags::default()
    };
    let msg = Config::load(&flags, env(&[])).unwrap_err().to_string();
    assert!(msg.contains("max_payload"), "{msg}");

    let flags = Flags {
        set: vec!["shutdown_grace=soon".into()],
        ..Flags::default()
    };
    let msg = Config::load(&flags, env(&[])).unwrap_err().to_string();
    assert!(
        msg.contains("shutdown_grace") && msg.contains("--set"),
        "{msg}"
    );
}

/// The example in deploy/ documents the defaults; it must not drift from them.
#[test]
fn deploy_example_equals_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/batchd.toml");
    let flags = Flags {
        config: Some(path.clone()),
        ..Flags::default()
    };
    let c = Config::load(&flags, env(&[])).unwrap();
    assert_eq!(
        c,
        Config::default(),
        "deploy/batchd.toml drifted from Config::default()"
    );
    let text = std::fs::read_to_string(&path).unwrap();
    for field in field_names() {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{field} ="))),
            "deploy/batchd.toml does not show {field}"
        );
    }
}
