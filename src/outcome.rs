//! How a job ended: the one table of outcome names and indices, used by the engine, its metrics and
//! spans, the service's protobuf mapping and the client's records and summary.

use crate::proto;

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The handler succeeded.
    Ok,
    /// The handler failed.
    Failed,
    /// Stopped by the client or by shutdown before it finished.
    Cancelled,
    /// Ran longer than its timeout.
    TimedOut,
    /// Not admitted.
    Rejected,
}

impl Outcome {
    /// Every outcome, in [`Outcome::index`] order: per-outcome counters are arrays of this length.
    pub const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::Failed,
        Outcome::Cancelled,
        Outcome::TimedOut,
        Outcome::Rejected,
    ];

    /// The outcome's place in [`Outcome::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The lowercase name used in labels, span attributes, JSON records and job logs: `ok`,
    /// `failed`, `cancelled`, `timed_out` or `rejected`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
            Outcome::TimedOut => "timed_out",
            Outcome::Rejected => "rejected",
        }
    }

    /// The outcome of a protobuf `Outcome` value; `None` for `OUTCOME_UNSPECIFIED` or an unknown
    /// number.
    pub fn from_proto(value: i32) -> Option<Self> {
        match proto::Outcome::try_from(value).ok()? {
            proto::Outcome::Ok => Some(Outcome::Ok),
            proto::Outcome::Failed => Some(Outcome::Failed),
            proto::Outcome::Cancelled => Some(Outcome::Cancelled),
            proto::Outcome::TimedOut => Some(Outcome::TimedOut),
            proto::Outcome::Rejected => Some(Outcome::Rejected),
            proto::Outcome::Unspecified => None,
        }
    }
}

impl From<Outcome> for proto::Outcome {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Ok => proto::Outcome::Ok,
            Outcome::Failed => proto::Outcome::Failed,
            Outcome::Cancelled => proto::Outcome::Cancelled,
            Outcome::TimedOut => proto::Outcome::TimedOut,
            Outcome::Rejected => proto::Outcome::Rejected,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_index_order_and_round_trips_through_the_proto() {
        for (i, o) in Outcome::ALL.into_iter().enumerate() {
            assert_eq!(o.index(), i);
            assert_eq!(Outcome::from_proto(proto::Outcome::from(o) as i32), Some(o));
        }
        assert_eq!(
            Outcome::from_proto(proto::Outcome::Unspecified as i32),
            None
        );
        assert_eq!(Outcome::from_proto(99), None);
    }
}
