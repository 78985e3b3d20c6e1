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
