//! The `[[exec]]` table of one exec handler, and its validation into a runnable form.

use std::collections::{BTreeMap, HashSet};
use std::ffi::CString;
use std::path::PathBuf;
use std::time::Duration;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::handlers::{quote, HandlerError, Params, Registry};
use crate::units::{self, ByteSize};

/// Longest `kill_grace`: shutdown waits about this long for the process groups of cancelled jobs.
pub const MAX_KILL_GRACE: Duration = Duration::from_secs(60);
/// Longest handler name.
const MAX_NAME: usize = 128;
/// Smallest `memory_max`: below it hardly any program starts.
const MIN_MEMORY_MAX: ByteSize = ByteSize::mib(1);

/// One `[[exec]]` table: a command run once per job, the params it takes and its limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    /// The `Job.handler` name clients use.
    pub name: String,
    /// One line for `ListHandlers`; empty means one made from the command.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Program and arguments; an argument that is exactly `{param}` becomes that param's value.
    pub command: Vec<String>,
    /// Every param a job must send, with the regex its whole value must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    /// Timeout of this handler's jobs that set none, and the cap on those that do.
    #[serde(default = "default_timeout", with = "units::duration")]
    pub timeout: Duration,
    /// Most bytes the command may write to stdout; beyond it the job fails and the command is killed.
    #[serde(default = "default_max_output")]
    pub max_output: ByteSize,
    /// Jobs of this handler running at once (below the daemon's `workers`); none means no own cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    /// Environment of the command; everything else is cleared except `PATH`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory of the command; none means the daemon's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<PathBuf>,
    /// Time between SIGTERM and SIGKILL to the command's process tree when a job is stopped.
    #[serde(default = "default_kill_grace", with = "units::duration")]
    pub kill_grace: Duration,
    /// How a job's processes are held together: a cgroup each when batchd can make one (`auto`),
    /// always (`cgroup`: no start without one), or a process group only (`process-group`).
    #[serde(default, skip_serializing_if = "IsolationSetting::is_auto")]
    pub isolation: IsolationSetting,
    /// `memory.max` of each job's cgroup: a job that needs more is killed and FAILED "out of
    /// memory". Needs cgroup mode with the memory controller delegated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<ByteSize>,
    /// `pids.max` of each job's cgroup: processes and threads a job may have at once. Needs cgroup
    /// mode with the pids controller delegated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<u64>,
}

/// The `isolation` of an `[[exec]]` table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IsolationSetting {
    /// A cgroup per job where batchd can write a cgroup v2 subtree, else a process group.
    #[default]
    Auto,
    /// A cgroup per job; the daemon does not start without a writable cgroup v2 subtree.
    Cgroup,
    /// A process group per job, even where cgroups are possible.
    ProcessGroup,
}

/// An exec handler's table that cannot be used: names the handler and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("exec {handler:?}: {field}: {reason}")]
pub struct SpecError {
    /// The handler's name.
    pub handler: String,
    /// The field, e.g. `params.size` or `command[2]`.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

/// One element of a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Arg {
    /// Passed as it is.
    Literal(String),
    /// Replaced by the value of this param.
    Param(String),
}

/// A param's rule: the regex as written and compiled to match whole values.
#[derive(Debug, Clone)]
pub(super) struct Rule {
    pub(super) source: String,
    pub(super) regex: Regex,
}

/// A validated spec's command line and param rules: what checks a job's params and builds its
/// argv (public so that fuzzing and tests reach the code the handler runs).
#[derive(Debug, Clone)]
pub struct Template {
    pub(super) argv: Vec<Arg>,
    pub(super) rules: BTreeMap<String, Rule>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_max_output() -> ByteSize {
    ByteSize::mib(8)
}

fn default_kill_grace() -> Duration {
    Duration::from_secs(2)
}

/// Checks every spec alone and against the daemon: unique names that no built-in handler uses, a
/// timeout and output cap within the daemon's.
pub fn validate(
    specs: &[ExecSpec],
    max_output: ByteSize,
    max_job_timeout: Duration,
) -> Result<(), SpecError> {
    let builtin = Registry::builtin();
    let mut seen = HashSet::new();
    for spec in specs {
        spec.compile()?;
        if builtin.get(&spec.name).is_some() {
            return Err(spec.error("name", "is the name of a built-in handler"));
        }
        if !seen.insert(spec.name.as_str()) {
            return Err(spec.error("name", "is used by another [[exec]] table"));
        }
        if spec.timeout > max_job_timeout {
            return Err(spec.error(
                "timeout",
                format!(
                    "must not be longer than max_job_timeout ({})",
                    humantime::format_duration(max_job_timeout)
                ),
            ));
        }
        if spec.max_output > max_output {
            return Err(spec.error(
                "max_output",
                format!("must not be larger than the daemon's max_output ({max_output})"),
            ));
        }
    }
    Ok(())
}

// === impl IsolationSetting ===

impl IsolationSetting {
    fn is_auto(&self) -> bool {
        *self == Self::Auto
    }
}

// === impl ExecSpec ===

impl ExecSpec {
    /// A spec running `command` with every optional field at its default.
    pub fn new(name: impl Into<String>, command: &[&str]) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            params: BTreeMap::new(),
            timeout: default_timeout(),
            max_output: default_max_output(),
            concurrency: None,
            env: BTreeMap::new(),
            cwd: None,
            kill_grace: default_kill_grace(),
            isolation: IsolationSetting::Auto,
            memory_max: None,
            pids_max: None,
        }
    }

    /// Whether the spec sets a limit that needs a cgroup.
    pub(super) fn has_limits(&self) -> bool {
        self.memory_max.is_some() || self.pids_max.is_some()
    }

    pub(super) fn error(&self, field: impl Into<String>, reason: impl Into<String>) -> SpecError {
        SpecError {
            handler: self.name.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Validates the spec on its own and compiles its command line and param rules.
    pub fn compile(&self) -> Result<Template, SpecError> {
        let name_ok = self
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
            && self
                .name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
            && self.name.len() <= MAX_NAME;
        if !name_ok {
            return Err(self.error(
                "name",
                format!(
                    "must be 1 to {MAX_NAME} ASCII letters, digits, '-', '_', '.' or ':', \
                     starting with a letter or digit"
                ),
            ));
        }
        if self.description.contains('\0') {
            return Err(self.error("description", "contains a NUL byte"));
        }
        let mut rules = BTreeMap::new();
        for (param, source) in &self.params {
            let field = format!("params.{param}");
            if !is_ident(param) {
                return Err(self.error(
                    field,
                    "a param name is ASCII letters, digits and '_', not starting with a digit",
                ));
            }
            // \A and \z anchor the whole value whatever the rule's own anchors or flags are. The
            // rule must be a regex on its own first: `a)|(b` would close the group early and
            // leave each anchor on one branch only.
            let bad = |e: &dyn std::fmt::Display| {
                self.error(&field, format!("bad regex {source:?}: {e}"))
            };
            regex_syntax::Parser::new()
                .parse(source)
                .map_err(|e| bad(&e))?;
            let regex = Regex::new(&format!(r"\A(?:{source})\z")).map_err(|e| bad(&e))?;
            rules.insert(
                param.clone(),
                Rule {
                    source: source.clone(),
                    regex,
                },
            );
        }
        let argv = self.parse_command(&rules)?;
        for param in rules.keys() {
            if !argv.contains(&Arg::Param(param.clone())) {
                return Err(self.error(
                    format!("params.{param}"),
                    format!("no argument of command is the placeholder {{{param}}}"),
                ));
            }
        }
        if self.timeout.is_zero() {
            return Err(self.error("timeout", "must be positive"));
        }
        if let Some(n) = self.concurrency {
            if n == 0 || n > tokio::sync::Semaphore::MAX_PERMITS {
                return Err(self.error(
                    "concurrency",
                    "must be at least 1 (leave it out for no cap)",
                ));
            }
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains(['=', '\0']) {
                return Err(self.error(
                    format!("env.{key}"),
                    "a variable name is non-empty, without '=' or NUL",
                ));
            }
            if value.contains('\0') {
                return Err(self.error(format!("env.{key}"), "contains a NUL byte"));
            }
        }
        if let Some(cwd) = &self.cwd {
            if cwd.as_os_str().is_empty() || cwd.to_string_lossy().contains('\0') {
                return Err(self.error("cwd", "must be a non-empty path without NUL"));
            }
        }
        if self.kill_grace > MAX_KILL_GRACE {
            return Err(self.error(
                "kill_grace",
                format!(
                    "must be at most {} (shutdown waits for it)",
                    humantime::format_duration(MAX_KILL_GRACE)
                ),
            ));
        }
        if let Some(max) = self.memory_max {
            if max < MIN_MEMORY_MAX {
                return Err(self.error("memory_max", format!("must be at least {MIN_MEMORY_MAX}")));
            }
        }
        if self.pids_max == Some(0) {
            return Err(self.error("pids_max", "must be at least 1"));
        }
        if self.isolation == IsolationSetting::ProcessGroup && self.has_limits() {
            let field = if self.memory_max.is_some() {
                "memory_max"
            } else {
                "pids_max"
            };
            return Err(self.error(
                field,
                "needs a cgroup per job, but isolation is \"process-group\"",
            ));
        }
        Ok(Template { argv, rules })
    }

    fn parse_command(&self, rules: &BTreeMap<String, Rule>) -> Result<Vec<Arg>, SpecError> {
        if self.command.is_empty() {
            return Err(self.error("command", "is empty; it must name a program"));
        }
        let mut argv = Vec::with_capacity(self.command.len());
        for (i, arg) in self.command.iter().enumerate() {
            let field = || format!("command[{i}]");
            if arg.contains('\0') {
                return Err(self.error(field(), "contains a NUL byte"));
            }
            let inner = arg.strip_prefix('{').and_then(|a| a.strip_suffix('}'));
            let parsed = match inner {
                // `{{name}}` is the literal `{name}`.
                Some(lit)
                    if lit.starts_with('{')
                        && lit.ends_with('}')
                        && is_ident(&lit[1..lit.len() - 1]) =>
                {
                    Arg::Literal(lit.to_owned())
                }
                Some(param) if is_ident(param) => {
                    if !rules.contains_key(param) {
                        return Err(self.error(
                            field(),
                            format!("placeholder {arg} has no rule in params (add params.{param} = \"<regex>\")"),
                        ));
                    }
                    Arg::Param(param.to_owned())
                }
                _ => {
                    if let Some(param) = rules.keys().find(|p| arg.contains(&format!("{{{p}}}"))) {
                        return Err(self.error(
                            field(),
                            format!(
                                "{{{param}}} inside {arg:?}: a placeholder must be a whole argument \
                                 (there is no shell to split or join arguments)"
                            ),
                        ));
                    }
                    Arg::Literal(arg.clone())
                }
            };
            if i == 0 {
                if arg.is_empty() {
                    return Err(self.error(field(), "the program is empty"));
                }
                if matches!(parsed, Arg::Param(_)) {
                    return Err(self.error(
                        field(),
                        "the program cannot be a placeholder: clients must not choose what runs",
                    ));
                }
            }
            argv.push(parsed);
        }
        Ok(argv)
    }

    /// The description for `ListHandlers`: the configured one, or one made from the command.
    pub(super) fn describe(&self) -> String {
        if !self.description.is_empty() {
            return self.description.clone();
        }
        let params = if self.params.is_empty() {
            "No params.".to_owned()
        } else {
            let names: Vec<&str> = self.params.keys().map(String::as_str).collect();
            format!("Params: {}.", names.join(", "))
        };
        format!(
            "Runs `{}` with the payload on stdin; stdout is the output. {params}",
            self.command.join(" ")
        )
    }
}

// === impl Template ===

impl Template {
    /// Why `params` cannot run this command: an unknown or missing param, or a value its rule refuses.
    pub fn check(&self, params: &Params) -> Result<(), String> {
        if let Some(unknown) = params.keys().filter(|k| !self.rules.contains_key(*k)).min() {
            let takes = if self.rules.is_empty() {
                "none".to_owned()
            } else {
                let names: Vec<&str> = self.rules.keys().map(String::as_str).collect();
                names.join(", ")
            };
            return Err(format!(
                "unknown param {} (this handler takes {takes})",
                quote(unknown)
            ));
        }
        for (name, rule) in &self.rules {
            let Some(value) = params.get(name) else {
                return Err(format!("missing param {name:?}"));
            };
            if value.contains('\0') || !rule.regex.is_match(value) {
                return Err(format!(
                    "param {name:?}: {} does not match {:?}",
                    quote(value),
                    rule.source
                ));
            }
        }
        Ok(())
    }

    /// The program, as configured.
    pub fn program(&self) -> &str {
        match self.argv.first() {
            Some(Arg::Literal(p)) => p,
            _ => "",
        }
    }

    /// The command line with `params` (already checked) in place of the placeholders: one
    /// argument per element of the spec's `command`, whatever the values hold.
    pub fn argv(&self, params: &Params) -> Result<Vec<CString>, HandlerError> {
        self.argv
            .iter()
            .map(|arg| {
                let arg = match arg {
                    Arg::Literal(s) => s.as_str(),
                    Arg::Param(p) => params.get(p).map_or("", String::as_str),
                };
                CString::new(arg)
                    .map_err(|_| HandlerError("an argument contains a NUL byte".into()))
            })
            .collect()
    }
}

/// An identifier: ASCII letters, digits and `_`, not starting with a digit.
fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
