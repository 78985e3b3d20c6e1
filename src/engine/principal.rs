//! The principal table in force: who a call is, which handlers it may use, its quotas and figures.
//!
//! The table is swapped whole on reload (SIGHUP); a call keeps the [`Principal`] it was admitted
//! with. Each name keeps one row for its life in the daemon (its figures and its scheduler group),
//! so a reload neither resets a principal's counters nor grows the metrics beyond the names that
//! were ever configured.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use super::metrics::Rejection;
use super::scheduler::Scheduler;
use crate::auth::{self, Credentials, Identities, PrincipalError, PrincipalSpec, ANONYMOUS};
use crate::error::Error;

/// The scheduler group of the principal at figures row `row`: group 0 is the health probe's own
/// (never capped, so a principal at its `max_running` cannot hold the probe back).
pub(crate) fn group_of(row: usize) -> usize {
    row + 1
}

/// A caller the daemon knows: a configured principal, or the anonymous one when none is.
#[derive(Debug)]
pub struct Principal {
    name: Arc<str>,
    /// Its row in the per-principal figures and its group in the scheduler.
    row: usize,
    max_calls: Option<usize>,
    /// Handlers its jobs may use; `None`: all.
    handlers: Option<HashSet<String, foldhash::fast::RandomState>>,
    stats: Arc<PrincipalStats>,
}

/// A principal's figures, kept across reloads.
#[derive(Debug, Default)]
pub(crate) struct PrincipalStats {
    /// Calls admitted and not ended (what `max_calls` counts).
    pub(crate) calls_open: AtomicU64,
    /// Calls admitted since start.
    pub(crate) calls: AtomicU64,
    /// Calls refused, by [`Rejection`].
    pub(crate) rejected: [AtomicU64; Rejection::COUNT],
    /// Jobs finished, by outcome in `Outcome::ALL` order (folded in by sessions).
    pub(crate) finished: [AtomicU64; 5],
}

/// One principal's call slot: taken when its call is admitted, given back when the call ends.
#[derive(Debug)]
pub(crate) struct CallSlot(Arc<Principal>);

/// The table in force.
#[derive(Debug, Default)]
struct Table {
    list: Vec<Arc<Principal>>,
    ids: Identities,
    /// Set when no principal is configured: every call is this one.
    anonymous: Option<Arc<Principal>>,
    reflection_open: bool,
}

/// The principal table in force and the rows of every name ever installed. The default table
/// identifies nobody: every call is refused until a table is installed.
#[derive(Debug, Default)]
pub(crate) struct Principals {
    current: RwLock<Arc<Table>>,
    rows: Mutex<Vec<(Arc<str>, Arc<PrincipalStats>)>>,
}

// === impl Principal ===

impl Principal {
    /// The principal's name (`_anonymous` when none is configured).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether its jobs may use the handler `name`.
    pub fn may_use(&self, handler: &str) -> bool {
        self.handlers.as_ref().is_none_or(|h| h.contains(handler))
    }

    /// Its group in the scheduler.
    pub(crate) fn group(&self) -> usize {
        group_of(self.row)
    }

    pub(crate) fn stats(&self) -> &PrincipalStats {
        &self.stats
    }

    /// Takes one of its call slots, or says which quota refuses it.
    pub(crate) fn enter(self: &Arc<Self>) -> Result<CallSlot, Error> {
        let limit = self.max_calls.map_or(u64::MAX, |n| n as u64);
        let open = &self.stats.calls_open;
        match open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit).then_some(n + 1)
        }) {
            Ok(_) => Ok(CallSlot(Arc::clone(self))),
            Err(_) => {
                self.rejected(Rejection::PrincipalMaxCalls);
                Err(Error::PrincipalMaxCalls {
                    principal: self.name.to_string(),
                    limit: self.max_calls.unwrap_or(usize::MAX),
                })
            }
        }
    }

    /// Counts a refused call of this principal.
    pub(crate) fn rejected(&self, why: Rejection) {
        self.stats.rejected[why.index()].fetch_add(1, Ordering::Relaxed);
    }
}

impl CallSlot {
    /// Counts the call as admitted (its session starts).
    pub(crate) fn admitted(&self) {
        self.0.stats.calls.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        self.0.stats.calls_open.fetch_sub(1, Ordering::AcqRel);
    }
}

// === impl Principals ===

impl Principals {
    /// The table in force.
    fn current(&self) -> Arc<Table> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Builds a table from `specs` and puts it in force: new calls are identified by it, open ones
    /// keep their principal. Returns how many principals it holds. With no spec, every call is
    /// anonymous. Specs that do not validate leave the table in force as it is.
    pub(crate) fn install(
        &self,
        specs: &[PrincipalSpec],
        reflection_open: bool,
        scheduler: &Scheduler,
    ) -> Result<usize, PrincipalError> {
        auth::validate(specs)?;
        let mut list = Vec::with_capacity(specs.len());
        let anonymous = specs.is_empty().then(|| PrincipalSpec::new(ANONYMOUS));
        let all: Vec<&PrincipalSpec> = specs.iter().chain(&anonymous).collect();
        {
            let mut rows = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
            for spec in all {
                let row = match rows.iter().position(|(n, _)| **n == *spec.name) {
                    Some(row) => row,
                    None => {
                        rows.push((Arc::from(spec.name.as_str()), Arc::default()));
                        rows.len() - 1
                    }
                };
                scheduler.configure(group_of(row), spec.weight, spec.max_running);
                list.push(Arc::new(Principal {
                    name: Arc::clone(&rows[row].0),
                    row,
                    max_calls: spec.max_calls,
                    handlers: spec.handlers.as_ref().map(|h| h.iter().cloned().collect()),
                    stats: Arc::clone(&rows[row].1),
                }));
            }
        }
        let anonymous = anonymous.and_then(|_| list.pop());
        let table = Table {
            ids: Identities::new(specs),
            list,
            anonymous,
            reflection_open,
        };
        let n = table.list.len();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
        Ok(n)
    }

    /// The principal `creds` identify (the anonymous one when none is configured).
    pub(crate) fn authenticate(&self, creds: &Credentials<'_>) -> Result<Arc<Principal>, Error> {
        let table = self.current();
        if let Some(anonymous) = &table.anonymous {
            return Ok(Arc::clone(anonymous));
        }
        let i = table
            .ids
            .identify(creds)
            .map_err(|e| Error::Unauthenticated(e.to_string()))?;
        table
            .list
            .get(i)
            .cloned()
            .ok_or_else(|| Error::Unauthenticated(auth::AuthError::Invalid.to_string()))
    }

    /// Whether reflection needs the same credentials as BatchService.
    pub(crate) fn reflection_needs_credentials(&self) -> bool {
        let table = self.current();
        table.anonymous.is_none() && !table.reflection_open
    }

    /// Every principal ever installed, with its figures, by row.
    pub(crate) fn rows(&self) -> Vec<(Arc<str>, Arc<PrincipalStats>)> {
        self.rows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
