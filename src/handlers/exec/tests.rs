use super::pipes::{read_capped, read_tail, Tail, STDERR_TAIL};
use super::spec::Arg;
use super::*;

fn spec(command: &[&str], params: &[(&str, &str)]) -> ExecSpec {
    let mut s = ExecSpec::new("thumbnail", command);
    s.params = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    s
}

fn params(pairs: &[(&str, &str)]) -> Params {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn compile_error(s: &ExecSpec) -> String {
    s.compile().unwrap_err().to_string()
}

#[test]
fn errors_name_the_handler_and_the_field() {
    let s = spec(&["convert", "{size}"], &[("size", "([0-9]")]);
    let msg = compile_error(&s);
    assert!(
        msg.starts_with("exec \"thumbnail\": params.size: bad regex"),
        "{msg}"
    );

    let msg = compile_error(&spec(&[], &[]));
    assert!(msg.contains("command: is empty"), "{msg}");

    let msg = compile_error(&spec(&["convert", "{size}"], &[]));
    assert!(
        msg.contains("command[1]: placeholder {size} has no rule"),
        "{msg}"
    );

    let msg = compile_error(&spec(&["convert", "-resize={size}"], &[("size", ".*")]));
    assert!(
        msg.contains("command[1]") && msg.contains("whole argument"),
        "{msg}"
    );

    let msg = compile_error(&spec(&["{prog}"], &[("prog", ".*")]));
    assert!(msg.contains("command[0]: the program cannot be"), "{msg}");

    let msg = compile_error(&spec(&["convert"], &[("size", ".*")]));
    assert!(msg.contains("params.size: no argument"), "{msg}");

    let msg = compile_error(&spec(&["x", "{1x}"], &[("1x", ".*")]));
    assert!(msg.contains("params.1x"), "{msg}");

    let mut s = spec(&["cat"], &[]);
    s.concurrency = Some(0);
    assert!(compile_error(&s).contains("concurrency"));
    s.concurrency = None;
    s.kill_grace = MAX_KILL_GRACE + Duration::from_secs(1);
    assert!(compile_error(&s).contains("kill_grace"));
    s.kill_grace = Duration::ZERO;
    s.timeout = Duration::ZERO;
    assert!(compile_error(&s).contains("timeout: must be positive"));
    s.timeout = Duration::from_secs(1);
    s.env.insert("A=B".into(), "x".into());
    assert!(compile_error(&s).contains("env.A=B"));
    s.env.clear();
    s.name = "has space".into();
    assert!(compile_error(&s).contains("name"));
    s.name = "ok-name.v2".into();
    assert!(s.compile().is_ok());
}

#[test]
fn a_rule_cannot_escape_the_whole_value_anchors() {
    // Found by fuzz/fuzz_targets/exec_template.rs: wrapped as `\A(?:rule)\z`, the rule
    // `[0-9]+)|(.*` compiled into `\A(?:[0-9]+)|(.*)\z`, which matches every value.
    for rule in ["[0-9]+)|(.*", "(?i))|(", "a)(?:b"] {
        let s = spec(&["convert", "{size}"], &[("size", rule)]);
        let msg = compile_error(&s);
        assert!(msg.contains("params.size: bad regex"), "{rule}: {msg}");
    }
    let exec = Exec::new(
        &spec(&["convert", "{size}"], &[("size", "[0-9]+|x")]),
        &Reaper::new(),
    )
    .unwrap();
    assert!(exec.check(&params(&[("size", "12")])).is_ok());
    assert!(exec.check(&params(&[("size", "12; rm -rf /")])).is_err());
}

#[test]
fn validation_against_the_daemon() {
    let max_out = crate::units::ByteSize::mib(8);
    let max_t = Duration::from_secs(3600);
    let echo = ExecSpec::new("echo", &["cat"]);
    let e = validate(&[echo], max_out, max_t).unwrap_err().to_string();
    assert_eq!(e, "exec \"echo\": name: is the name of a built-in handler");

    let a = ExecSpec::new("a", &["cat"]);
    let e = validate(&[a.clone(), a.clone()], max_out, max_t).unwrap_err();
    assert_eq!(e.field, "name");

    let mut big = a.clone();
    big.max_output = crate::units::ByteSize::mib(9);
    let e = validate(&[big], max_out, max_t).unwrap_err();
    assert_eq!(e.field, "max_output");

    let mut long = a.clone();
    long.timeout = Duration::from_secs(3601);
    let e = validate(&[long], max_out, max_t).unwrap_err();
    assert_eq!(e.field, "timeout");

    assert!(validate(&[a], max_out, max_t).is_ok());
}

#[test]
fn placeholders_are_whole_arguments_and_braces_can_be_literal() {
    let s = spec(
        &["tool", "{size}", "{{size}}", "{not a placeholder}", "x{y}"],
        &[("size", "[0-9]+")],
    );
    let c = s.compile().unwrap();
    assert_eq!(
        c.argv,
        vec![
            Arg::Literal("tool".into()),
            Arg::Param("size".into()),
            Arg::Literal("{size}".into()),
            Arg::Literal("{not a placeholder}".into()),
            Arg::Literal("x{y}".into()),
        ]
    );
}

#[test]
fn params_are_checked_whole_and_named() {
    let exec = Exec::new(
        &spec(
            &["convert", "{size}"],
            &[("size", "^[0-9]{1,4}x[0-9]{1,4}$")],
        ),
        &Reaper::new(),
    )
    .unwrap();
    assert_eq!(exec.check(&params(&[("size", "64x64")])), Ok(()));

    let e = exec.check(&params(&[])).unwrap_err();
    assert_eq!(e, "missing param \"size\"");

    let e = exec
        .check(&params(&[("size", "64x64"), ("zz", "1"), ("aa", "1")]))
        .unwrap_err();
    assert_eq!(e, "unknown param \"aa\" (this handler takes size)");

    // Shell metacharacters, a suffix after a newline, a NUL: refused by the anchored rule.
    for bad in [
        "64x64; rm -rf /",
        "64x64\nx",
        "64x64\0",
        "$(reboot)",
        "1x1 2x2",
    ] {
        let e = exec.check(&params(&[("size", bad)])).unwrap_err();
        assert!(e.starts_with("param \"size\": "), "{e}");
        assert!(e.contains("does not match"), "{e}");
    }

    let none = Exec::new(&spec(&["true"], &[]), &Reaper::new()).unwrap();
    let e = none.check(&params(&[("x", "1")])).unwrap_err();
    assert!(e.contains("takes none"), "{e}");
}

#[test]
fn rules_match_the_whole_value_even_without_anchors() {
    let exec = Exec::new(
        &spec(&["tool", "{n}"], &[("n", "[0-9]+|abc")]),
        &Reaper::new(),
    )
    .unwrap();
    assert!(exec.check(&params(&[("n", "123")])).is_ok());
    assert!(exec.check(&params(&[("n", "abc")])).is_ok());
    assert!(exec.check(&params(&[("n", "123abc")])).is_err());
    assert!(exec.check(&params(&[("n", "x123")])).is_err());
}

#[test]
fn the_environment_is_cleared_but_for_path_and_the_spec() {
    let os = |pairs: &[(&str, &str)]| -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    };
    let mut vars = BTreeMap::new();
    vars.insert("LC_ALL".to_owned(), "C".to_owned());
    let daemon_path = Some(OsString::from("/usr/bin:/bin"));
    assert_eq!(
        environment(daemon_path.clone(), &vars),
        os(&[("LC_ALL", "C"), ("PATH", "/usr/bin:/bin")])
    );
    assert_eq!(environment(None, &vars), os(&[("LC_ALL", "C")]));
    vars.insert("PATH".into(), "/opt/bin".into());
    assert_eq!(
        environment(daemon_path, &vars),
        os(&[("LC_ALL", "C"), ("PATH", "/opt/bin")])
    );
    // What a handler really gets: the same, from the daemon's own environment.
    let mut s = spec(&["env"], &[]);
    s.env.insert("LC_ALL".into(), "C".into());
    let exec = Exec::new(&s, &Reaper::new()).unwrap();
    let want: Vec<CString> = environment(std::env::var_os("PATH"), &s.env)
        .into_iter()
        .map(|(k, v)| {
            let var = format!("{}={}", k.to_str().unwrap(), v.to_str().unwrap());
            CString::new(var).unwrap()
        })
        .collect();
    assert_eq!(exec.env, want);
    assert_eq!(
        exec.search_path.as_deref(),
        std::env::var_os("PATH").as_deref().map(OsStrExt::as_bytes)
    );
}

#[test]
fn descriptions() {
    let mut s = spec(&["convert", "-", "{size}"], &[("size", ".*")]);
    assert_eq!(
        s.describe(),
        "Runs `convert - {size}` with the payload on stdin; stdout is the output. Params: size."
    );
    s.description = "Resize an image".into();
    assert_eq!(s.describe(), "Resize an image");
}

#[test]
fn the_stderr_tail_keeps_the_end() {
    let mut t = Tail::default();
    assert_eq!(t.describe(), "stderr is empty");
    t.push(b"first\n");
    assert_eq!(t.describe(), "stderr: first");
    for i in 0..1000 {
        t.push(format!("line{i}\n").as_bytes());
    }
    let d = t.describe();
    assert!(d.contains("line999"), "{d}");
    assert!(!d.contains("first"), "{d}");
    assert!(d.len() < STDERR_TAIL + 64, "{}", d.len());
    assert!(d.starts_with("stderr (last 2048 of "), "{d}");

    let mut big = Tail::default();
    big.push(&vec![b'x'; 10 * STDERR_TAIL]);
    assert_eq!(big.buf.len(), STDERR_TAIL);
}

#[tokio::test]
async fn output_is_capped() {
    let data = vec![7u8; 1000];
    let out = read_capped(&data[..], 1000).await.unwrap();
    assert_eq!(out.len(), 1000);
    let e = read_capped(&data[..], 999).await.unwrap_err();
    assert!(e.0.contains("over max_output (999 bytes)"), "{e}");
    let tail = read_tail(&data[..]).await.unwrap();
    assert_eq!(tail.describe().len(), "stderr: ".len() + 1000);
}

#[test]
fn out_of_memory_and_pids_max_are_named_in_the_failure() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let cgroup = cgroup::JobCgroup::fake(dir.path());
    let killed = ExitStatus::from_raw(9);
    let mut tail = Tail::default();
    tail.push(b"partial\n");
    let limits = Limits {
        memory_max: Some(32 * 1024 * 1024),
        pids_max: Some(16),
    };
    std::fs::write(
        dir.path().join("memory.events"),
        "low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("pids.events"), "max 2\n").unwrap();
    assert_eq!(
        failure(Some(&cgroup), killed, &tail, limits),
        "the command failed (signal: 9 (SIGKILL)); pids_max (16) stopped 2 fork(s); stderr: partial"
    );
    std::fs::write(
        dir.path().join("memory.events"),
        "oom 1\noom_kill 1\noom_group_kill 1\n",
    )
    .unwrap();
    assert_eq!(
        failure(Some(&cgroup), killed, &tail, limits),
        "out of memory: the job reached memory_max (32MiB) and the kernel killed it \
         (signal: 9 (SIGKILL)); stderr: partial"
    );
    // Without limits nothing is read; in process-group mode there is no cgroup.
    assert_eq!(
        failure(Some(&cgroup), killed, &tail, Limits::default()),
        "the command failed (signal: 9 (SIGKILL)); stderr: partial"
    );
    assert_eq!(
        failure(None, ExitStatus::from_raw(3 << 8), &tail, limits),
        "the command failed (exit status: 3); stderr: partial"
    );
}
