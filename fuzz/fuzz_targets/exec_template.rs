//! Exec param templating: an `[[exec]]` spec with placeholders and param rules, and a job's
//! params → `ExecSpec::compile` → `Template::check` → `Template::argv`.
//!
//! Input: three sections split by the byte 0xFF (never in UTF-8, so any text fits in a part):
//! the command's arguments, the rules (`name=regex`) and the params (`name=value`), the items of
//! a section split by 0xFE. E.g. `convert\xFE{size}\xFFsize=[0-9]+\xFFsize=12`.
//!
//! Properties:
//! - Never a panic; a spec is compiled or refused, a job's params accepted or refused.
//! - An accepted rule is a regex on its own (the daemon wraps it as `\A(?:rule)\z`; a rule that
//!   only compiles once wrapped could escape the anchors).
//! - Params are accepted exactly when each value matches its rule as a whole: checked against a
//!   matcher built independently from the rule's syntax tree with explicit start and end anchors.
//! - The argv of accepted params has exactly one argument per element of `command`: the program
//!   first, never empty and never a param, each `{param}` replaced by the whole value (whatever
//!   spaces, quotes, `;`, `$(…)` or newlines it holds), `{{name}}` by the literal `{name}`
//!   (the program too), anything else as written.
#![no_main]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use batchd::handlers::exec::{ExecSpec, IsolationSetting, Template};
use libfuzzer_sys::fuzz_target;
use regex_automata::meta;
use regex_syntax::hir::{Hir, Look};

/// Rules longer than this are not tried: compiling big regexes only slows the fuzzer down.
const MAX_RULE: usize = 128;

fuzz_target!(|data: &[u8]| run(data));

/// The items of one section.
fn items(section: Option<&[u8]>) -> Vec<String> {
    match section {
        None | Some([]) => Vec::new(),
        Some(s) => s
            .split(|b| *b == 0xFE)
            .map(|i| String::from_utf8_lossy(i).into_owned())
            .collect(),
    }
}

/// `name=value` items as pairs (the name up to the first `=`).
fn pairs(section: Option<&[u8]>) -> Vec<(String, String)> {
    items(section)
        .into_iter()
        .map(|i| match i.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (i, String::new()),
        })
        .collect()
}

fn run(data: &[u8]) {
    let mut sections = data.split(|b| *b == 0xFF);
    let command = items(sections.next());
    let rules = pairs(sections.next());
    let params = pairs(sections.next());
    if rules.iter().any(|(_, r)| r.len() > MAX_RULE) {
        return;
    }
    let mut spec = ExecSpec::new("fuzz", &[]);
    spec.command = command;
    spec.params = rules.into_iter().collect::<BTreeMap<_, _>>();
    spec.isolation = IsolationSetting::ProcessGroup;
    let Some(compiled) = compiled(&spec) else {
        return;
    };
    let (template, oracles) = &*compiled;
    let params: HashMap<String, String> = params.into_iter().collect();

    let mut accepts = params.keys().all(|k| spec.params.contains_key(k));
    for (name, oracle) in oracles {
        accepts &= match params.get(name) {
            Some(value) => !value.contains('\0') && oracle.is_match(value.as_str()),
            None => false,
        };
    }

    let checked = template.check(&params);
    assert_eq!(
        checked.is_ok(),
        accepts,
        "check says {checked:?} for {params:?} under {:?}",
        spec.params
    );
    let Ok(()) = checked else {
        return;
    };

    let argv = template
        .argv(&params)
        .expect("accepted params build an argv");
    assert_eq!(
        argv.len(),
        spec.command.len(),
        "one argument per command element"
    );
    assert!(!argv[0].as_bytes().is_empty(), "the program is never empty");
    for (arg, written) in argv.iter().zip(&spec.command) {
        let arg = arg.to_str().expect("UTF-8 in, UTF-8 out");
        let inner = written.strip_prefix('{').and_then(|w| w.strip_suffix('}'));
        match inner {
            Some(name) if spec.params.contains_key(name) => {
                assert_eq!(Some(arg), params.get(name).map(String::as_str), "{written}");
            }
            Some(lit)
                if lit.starts_with('{') && lit.ends_with('}') && ident(&lit[1..lit.len() - 1]) =>
            {
                assert_eq!(arg, lit, "{written}");
            }
            _ => assert_eq!(arg, written),
        }
    }
}

/// A spec compiled by the daemon, with each rule's oracle: the rule read alone (it must be a
/// regex by itself) between explicit start and end anchors. `None`: the daemon refused the spec, or
/// a rule is over the oracle's size limit.
type Compiled = Option<Rc<(Template, Vec<(String, meta::Regex)>)>>;

/// [`compile_uncached`], remembered for the last few thousand specs: most mutations change only the
/// params, and compiling regexes is most of the time of an input.
fn compiled(spec: &ExecSpec) -> Compiled {
    thread_local! {
        static CACHE: RefCell<HashMap<(Vec<String>, BTreeMap<String, String>), Compiled>> =
            RefCell::default();
    }
    let key = (spec.command.clone(), spec.params.clone());
    if let Some(hit) = CACHE.with_borrow(|c| c.get(&key).cloned()) {
        return hit;
    }
    let compiled = compile_uncached(spec);
    CACHE.with_borrow_mut(|c| {
        if c.len() >= 4096 {
            c.clear();
        }
        c.insert(key, compiled.clone());
    });
    compiled
}

fn compile_uncached(spec: &ExecSpec) -> Compiled {
    let template = spec.compile().ok()?;
    let program = &spec.command[0];
    let placeholder = program.strip_prefix('{').and_then(|p| p.strip_suffix('}'));
    assert!(
        placeholder.is_none_or(|p| !spec.params.contains_key(p)),
        "the program {program:?} is a param: a client would choose what runs"
    );
    let mut oracles = Vec::new();
    for (name, rule) in &spec.params {
        let hir = regex_syntax::Parser::new()
            .parse(rule)
            .unwrap_or_else(|e| panic!("rule {rule:?} was accepted but is no regex alone: {e}"));
        let whole = Hir::concat(vec![Hir::look(Look::Start), hir, Hir::look(Look::End)]);
        oracles.push((
            name.clone(),
            meta::Regex::builder().build_from_hir(&whole).ok()?,
        ));
    }
    Some(Rc::new((template, oracles)))
}

fn ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}
