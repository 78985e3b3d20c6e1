//! Where the cgroup is found, names and event files, and (as root) who a signal reaches.
use super::*;

#[test]
fn the_own_cgroup_is_found_through_the_cgroup2_mount() {
    let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    let cgroup = "4:memory:/x\n0::/\n";
    assert_eq!(
        own_dir(cgroup, mountinfo).unwrap(),
        PathBuf::from("/sys/fs/cgroup/unified")
    );
    // A bind mount of part of the hierarchy, with an escaped space.
    let tmp = tempfile::tempdir().unwrap();
    let point = tmp.path().join("my cg");
    fs::create_dir_all(point.join("batchd.service")).unwrap();
    let escaped = point.to_str().unwrap().replace(' ', "\\040");
    let mountinfo = format!("50 1 0:40 /system.slice {escaped} rw - cgroup2 cgroup2 rw\n");
    assert_eq!(
        own_dir("0::/system.slice/batchd.service\n", &mountinfo).unwrap(),
        point.join("batchd.service")
    );
    // The same prefix, but not a parent directory.
    let err = own_dir("0::/system.slice2/x\n", &mountinfo).unwrap_err();
    assert!(err.contains("no cgroup2 mount"), "{err}");
    let err = own_dir("1:name=systemd:/\n", &mountinfo).unwrap_err();
    assert!(err.contains("no cgroup v2"), "{err}");
}

#[test]
fn instance_names_and_event_files_parse() {
    let me = Instance {
        pid: 123,
        start: 4567,
        pid_ns: 4026531836,
    };
    assert_eq!(me.to_string(), "batchd-123-4567-4026531836");
    assert_eq!(Instance::parse("batchd-123-4567-4026531836"), Some(me));
    for other in [
        "batchd-x-1-2",
        "batchd-1-2",
        "batchd-1-2-3-4",
        "job-1",
        "batchd-probe-1",
    ] {
        assert_eq!(Instance::parse(other), None, "{other}");
    }
    assert!(pid_namespace().is_some());
    let events = "low 0\nhigh 0\nmax 4\noom 2\noom_kill 1\noom_group_kill 1\n";
    assert_eq!(event_count(events, "oom_kill"), 1);
    assert_eq!(event_count(events, "max"), 4);
    assert_eq!(event_count(events, "absent"), 0);
    assert_eq!(event_count("populated 1\nfrozen 0\n", "populated"), 1);
    assert_eq!(unescape("a\\040b\\134c"), "a b\\c");
    assert_eq!(unescape("trailing\\04"), "trailing\\04");
}

#[test]
fn signals_outside_the_group_reach_each_other_process_of_the_cgroup_once() {
    use std::os::unix::process::CommandExt;
    let cgroups = Cgroups::detect().unwrap_or_else(|why| {
        panic!("this test needs a writable cgroup v2 (root; CI has it): {why}")
    });
    let job = cgroups.create_job(&Limits::default()).unwrap();
    let procs = job.dir.join("cgroup.procs");
    // Two processes in the job's cgroup, each leading a process group of its own.
    let start = || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$0" && exec sleep 60"#)
            .arg(&procs)
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (start(), start());
    let pid = |c: &std::process::Child| Pid::from_raw(c.id() as i32).unwrap();
    let state = |c: &std::process::Child| {
        let stat = fs::read_to_string(format!("/proc/{}/stat", c.id())).unwrap();
        stat[stat.rfind(')').unwrap() + 2..].chars().next().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while procs_in(&job).len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the two processes joined the cgroup"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // SIGSTOP shows who got the signal: the process outside group `a` only.
    job.signal_outside(rustix::process::Signal::STOP, pid(&a));
    while state(&b) != 'T' {
        assert!(Instant::now() < deadline, "b is stopped");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_ne!(state(&a), 'T', "a's group was skipped");
    job.kill();
    assert!(!a.wait().unwrap().success() && !b.wait().unwrap().success());
    while job.populated() {
        assert!(Instant::now() < deadline, "the cgroup empties");
        std::thread::sleep(Duration::from_millis(2));
    }
    job.remove().unwrap();
}

fn procs_in(job: &JobCgroup) -> Vec<Pid> {
    procs(&job.dir)
}

#[test]
fn this_process_has_a_start_time() {
    let me = rustix::process::getpid();
    assert!(start_time(me).is_some());
    assert_eq!(start_time(me), start_time(me));
}
