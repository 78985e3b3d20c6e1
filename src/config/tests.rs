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
    // BATCHD_ENDPOINT is batchctl's, not a config field; HOME has no prefix. Neither may change a
    // field or fail the load.
    let c = Config::load(
        &Flags::default(),
        env(&[("BATCHD_ENDPOINT", "x"), ("HOME", "/"), ("BATCHD_", "1")]),
    )
    .unwrap();
    assert_eq!(c, Config::default());
    // While a prefixed field name next to them is still read.
    let c = Config::load(
        &Flags::default(),
        env(&[("BATCHD_ENDPOINT", "x"), ("BATCHD_WORKERS", "7")]),
    )
    .unwrap();
    assert_eq!(c.workers, 7);
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

fn set(pairs: &[&str]) -> Result<Config, ConfigError> {
    let flags = Flags {
        set: pairs.iter().map(|s| s.to_string()).collect(),
        ..Flags::default()
    };
    Config::load(&flags, env(&[]))
}

fn set_err(pairs: &[&str]) -> String {
    match set(pairs) {
        Ok(c) => panic!("{pairs:?} was accepted: {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn counts_are_capped_at_max_count() {
    for field in [
        "workers",
        "session_window",
        "max_calls",
        "max_jobs_per_batch",
    ] {
        let c = set(&[&format!("{field}={MAX_COUNT}")]).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(c, Config::default(), "{field} was set");
        for over in [MAX_COUNT + 1, usize::MAX >> 1] {
            let msg = set_err(&[&format!("{field}={over}")]);
            assert_eq!(
                msg,
                format!("invalid config: {field}: must be at most 1048576"),
                "{field}={over}"
            );
        }
    }
    // The flag takes a usize; the value still gets the range check.
    let flags = Flags {
        workers: Some(usize::MAX),
        ..Flags::default()
    };
    let msg = Config::load(&flags, env(&[])).unwrap_err().to_string();
    assert!(msg.contains("workers: must be at most 1048576"), "{msg}");
}

#[test]
fn cpu_workers_are_capped_at_the_blocking_pool() {
    let c = set(&["cpu_workers=512"]).unwrap();
    assert_eq!(c.effective_cpu_workers(), 512);
    // Over tokio's Semaphore::MAX_PERMITS (usize::MAX >> 3) `Semaphore::new` would panic.
    for over in [513, usize::MAX >> 2] {
        let msg = set_err(&[&format!("cpu_workers={over}")]);
        assert!(
            msg.starts_with("invalid config: cpu_workers: must be at most 512"),
            "{msg}"
        );
    }
    let cores = Config::default().effective_cpu_workers();
    assert!((1..=MAX_CPU_WORKERS).contains(&cores), "{cores}");
}

#[test]
fn durations_are_capped_at_one_year() {
    assert_eq!(
        humantime::format_duration(MAX_DURATION).to_string(),
        "1year"
    );
    // The cap is far from where adding it to an Instant or a Duration overflows.
    let later = MAX_DURATION * 1000;
    assert!(std::time::Instant::now().checked_add(later).is_some());
    assert!(tokio::time::Instant::now().checked_add(later).is_some());

    let fields = [
        "default_job_timeout",
        "max_job_timeout",
        "keepalive_interval",
        "keepalive_timeout",
        "shutdown_grace",
        "trace_flush_timeout",
    ];
    let all: Vec<String> = fields.iter().map(|f| format!("{f}=1year")).collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let c = set(&all).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.max_job_timeout, MAX_DURATION);
    assert_eq!(c.trace_flush_timeout, MAX_DURATION);

    for field in fields {
        // u64::MAX seconds made `Instant + timeout` panic in a job (a bare integer is TOML's i64).
        for over in [
            "18446744073709551615s",
            "9223372036854775807",
            "1year 1s",
            "366days",
        ] {
            let mut pairs = vec![format!("{field}={over}")];
            if field == "default_job_timeout" {
                // So that the only thing wrong is this field's own range.
                pairs.push(format!("max_job_timeout={over}"));
            }
            let pairs: Vec<&str> = pairs.iter().map(String::as_str).collect();
            let msg = set_err(&pairs);
            assert_eq!(
                msg,
                format!("invalid config: {field}: must be at most 1year"),
                "{field}={over}"
            );
        }
    }
}

#[test]
fn max_output_fits_in_one_grpc_message() {
    let c = set(&["max_output=4294967295"]).unwrap();
    assert_eq!(c.max_output, ByteSize(u64::from(u32::MAX)));
    for over in ["4GiB", "18446744073709551615"] {
        let msg = set_err(&[&format!("max_output={over}")]);
        assert_eq!(
            msg, "invalid config: max_output: must be under 4GiB",
            "{over}"
        );
    }
}

#[test]
fn session_bytes_has_a_floor() {
    let c = set(&["session_bytes=64KiB"]).unwrap();
    assert_eq!(c.session_bytes, ByteSize(64 * 1024));
    let msg = set_err(&["session_bytes=1KiB"]);
    assert_eq!(msg, "invalid config: session_bytes: must be at least 64KiB");
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

fn load_file(text: &str) -> Result<Config, ConfigError> {
    let f = file(text);
    let flags = Flags {
        config: Some(f.path().to_owned()),
        ..Flags::default()
    };
    Config::load(&flags, env(&[]))
}

#[test]
fn exec_tables_load_with_units_and_defaults() {
    let c = load_file(
        r#"
workers = 4

[[exec]]
name = "thumbnail"
description = "Resize"
command = ["convert", "-", "-thumbnail", "{size}", "png:-"]
params = { size = "^[0-9]{1,4}x[0-9]{1,4}$" }
timeout = "90s"
max_output = "1MiB"
concurrency = 2
env = { LC_ALL = "C" }
cwd = "/tmp"
kill_grace = "500ms"

[[exec]]
name = "count"
command = ["wc", "-c"]
"#,
    )
    .unwrap();
    assert_eq!(c.workers, 4);
    assert_eq!(c.exec.len(), 2);
    let t = &c.exec[0];
    assert_eq!(t.timeout, Duration::from_secs(90));
    assert_eq!(t.max_output, ByteSize::mib(1));
    assert_eq!(t.concurrency, Some(2));
    assert_eq!(t.kill_grace, Duration::from_millis(500));
    assert_eq!(t.env["LC_ALL"], "C");
    assert_eq!(c.exec[1], ExecSpec::new("count", &["wc", "-c"]));
}

#[test]
fn exec_errors_name_the_handler_and_the_field() {
    let cases = [
        (
            "[[exec]]\nname = \"thumbnail\"\ncommand = [\"convert\", \"{size}\"]\nparams = { size = \"([0-9]\" }\n",
            "invalid config: exec \"thumbnail\": params.size: bad regex",
        ),
        (
            "[[exec]]\nname = \"t\"\ncommand = []\n",
            "invalid config: exec \"t\": command: is empty",
        ),
        (
            "[[exec]]\nname = \"t\"\ncommand = [\"convert\", \"{size}\"]\n",
            "invalid config: exec \"t\": command[1]: placeholder {size} has no rule in params",
        ),
        (
            "[[exec]]\nname = \"sleep\"\ncommand = [\"sleep\", \"1\"]\n",
            "invalid config: exec \"sleep\": name: is the name of a built-in handler",
        ),
        (
            "[[exec]]\nname = \"a\"\ncommand = [\"true\"]\n[[exec]]\nname = \"a\"\ncommand = [\"false\"]\n",
            "invalid config: exec \"a\": name: is used by another [[exec]] table",
        ),
        (
            "[[exec]]\nname = \"a\"\ncommand = [\"true\"]\nmax_output = \"1GiB\"\n",
            "invalid config: exec \"a\": max_output: must not be larger than the daemon's max_output",
        ),
    ];
    for (text, want) in cases {
        let msg = load_file(text).unwrap_err().to_string();
        assert!(msg.starts_with(want), "want {want:?}, got {msg:?}");
    }

    // Errors serde finds inside a table (unknown field, wrong type) also name the handler.
    let msg = load_file("[[exec]]\nname = \"thumbnail\"\ncomand = [\"x\"]\n")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("exec \"thumbnail\"") && msg.contains("comand"),
        "{msg}"
    );
    let msg = load_file("[[exec]]\nname = \"t\"\ncommand = [\"x\"]\ntimeout = \"soon\"\n")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("exec \"t\"") && msg.contains("soon"), "{msg}");
    let msg = load_file("[[exec]]\ncommand = [\"x\"]\n")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("exec table #1") && msg.contains("name"),
        "{msg}"
    );
}

#[test]
fn exec_tables_come_from_the_file_only() {
    // BATCHD_EXEC is not a config variable (exec is not a scalar field).
    let c = Config::load(&Flags::default(), env(&[("BATCHD_EXEC", "x")])).unwrap();
    assert!(c.exec.is_empty());
    assert!(!field_names().contains(&"exec".to_owned()));
}

/// The commented `[[exec]]` example in deploy/batchd.toml, uncommented, is a valid config.
#[test]
fn deploy_exec_example_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/batchd.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let start = text
        .lines()
        .position(|l| l == "# [[exec]]")
        .expect("deploy/batchd.toml shows a commented [[exec]] example");
    let example: String = text
        .lines()
        .skip(start)
        .map_while(|l| {
            l.strip_prefix("# ")
                .or(if l == "#" { Some("") } else { None })
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let c = load_file(&example).unwrap_or_else(|e| panic!("{e}\n{example}"));
    assert_eq!(c.exec.len(), 1, "{example}");
    assert_eq!(c.exec[0].name, "thumbnail");
}

/// The commented `[[principal]]` example in deploy/batchd.toml, uncommented, is a valid config.
#[test]
fn deploy_principal_example_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/batchd.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let start = text
        .lines()
        .position(|l| l == "# [[principal]]")
        .expect("deploy/batchd.toml shows a commented [[principal]] example");
    let example: String = text
        .lines()
        .skip(start)
        .map_while(|l| l.strip_prefix("# "))
        .map(|l| format!("{l}\n"))
        .collect();
    let c = load_file(&example).unwrap_or_else(|e| panic!("{e}\n{example}"));
    assert_eq!(c.principal.len(), 1, "{example}");
    let p = &c.principal[0];
    assert_eq!(
        (p.name.as_str(), p.weight, p.max_calls, p.max_running),
        ("thumbnailer", 2, Some(100), Some(64))
    );
}

#[test]
fn principal_tables_load_and_bad_ones_name_the_table_and_the_field() {
    let digest = "ab".repeat(32);
    let c = load_file(&format!(
        "[[principal]]\nname = \"a\"\ntoken_sha256 = \"{digest}\"\n\n\
         [[principal]]\nname = \"b\"\nclient_cert = \"CN=b\"\nweight = 3\n\
         handlers = [\"echo\"]\n"
    ))
    .unwrap();
    assert_eq!(c.principal.len(), 2);
    assert_eq!(c.principal[0].weight, 1, "weight defaults to 1");
    assert_eq!(
        c.principal[1].handlers.as_deref(),
        Some(&["echo".to_owned()][..])
    );

    let err = |text: &str| load_file(text).unwrap_err().to_string();
    let e = err("[[principal]]\nname = \"a\"\ntoken_sha256 = \"xyz\"\n");
    assert!(
        e.starts_with("invalid config: principal \"a\": token_sha256: must be the hex SHA-256"),
        "{e}"
    );
    let e = err(&format!(
        "[[principal]]\nname = \"a\"\ntoken_sha256 = \"{digest}\"\nweight = 0\n"
    ));
    assert_eq!(
        e,
        "invalid config: principal \"a\": weight: must be between 1 and 10000"
    );
    let e = err("[[principal]]\nname = \"a\"\ntokn = \"x\"\n");
    assert!(e.contains("principal \"a\": unknown field `tokn`"), "{e}");
    let e = err("[[principal]]\nname = \"a\"\nclient_cert = \"CN=a\"\nweight = -1\n");
    assert!(e.contains("principal \"a\""), "{e}");
}

#[test]
fn principals_come_from_the_file_only_and_memory_budget_has_a_floor() {
    let c = Config::load(&Flags::default(), env(&[("BATCHD_PRINCIPAL", "x")])).unwrap();
    assert!(c.principal.is_empty());
    assert!(!field_names().contains(&"principal".to_owned()));
    let c = set(&["memory_budget=256MiB", "reflection_open=true"]).unwrap();
    assert_eq!(c.memory_budget, ByteSize::mib(256));
    assert!(c.reflection_open);
    let msg = set_err(&["memory_budget=1KiB"]);
    assert_eq!(msg, "invalid config: memory_budget: must be at least 64KiB");
}

#[test]
fn a_toml_text_loads_as_a_file_does() {
    let text = "workers = 3\n[[exec]]\nname = \"t\"\ncommand = [\"true\"]\n";
    let from_file = load_file(text).unwrap();
    assert_eq!(Config::from_toml(text).unwrap(), from_file);
    assert_eq!(from_file.workers, 3);
    let e = Config::from_toml("workers = 0").unwrap_err().to_string();
    assert!(e.contains("workers"), "{e}");
    let e = Config::from_toml("workers = [").unwrap_err().to_string();
    assert!(e.contains("config text"), "{e}");
}

#[test]
fn reserved_workers_default_to_a_64th_and_leave_the_others_a_slot() {
    assert_eq!(Config::default().effective_reserved_workers(), 4);
    assert_eq!(
        set(&["workers=63"]).unwrap().effective_reserved_workers(),
        0
    );
    let c = set(&["workers=8", "reserved_workers=7"]).unwrap();
    assert_eq!(c.effective_reserved_workers(), 7);
    for bad in [
        &["workers=8", "reserved_workers=8"][..],
        &["reserved_workers=256"],
    ] {
        let msg = set_err(bad);
        assert!(
            msg.starts_with("invalid config: reserved_workers: must be less than workers"),
            "{msg}"
        );
    }
}
