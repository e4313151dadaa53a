//! The records of Valv's oversight work, as pure logic: no I/O, no clock (times and seeds are
//! passed in). The server stores them sealed and executes what they decide.
//!
//! - [`review`]: the systematic, recurrent check of access logs HSLF-FS 2016:40 4 kap. 9 §
//!   and HIPAA §164.308(a)(1)(ii)(D) require: a reproducible random sample of a unit's patient
//!   accesses in a period plus every access an alert flagged, an outcome per item, finished
//!   only when every item is judged.
//! - [`incident`]: an incident from detection to closing (GDPR Art. 33–34): its stages with who
//!   and when, the containment actions taken, the 72-hour notification clock, the affected
//!   patients from the audit log, and the lessons learned it cannot close without.

pub mod compliance;
pub mod incident;
pub mod review;

/// Why a change to a review or an incident was refused; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The request itself is wrong (an unknown outcome, an empty note, no such item).
    Invalid(String),
    /// The record is not in a state that allows it (finished, closed, a stage out of order).
    State(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Invalid(m) | Error::State(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

/// Notes are free text written by auditors: bounded, and never empty where one is required.
pub const MAX_NOTE: usize = 4000;

fn note(text: &str, what: &str) -> Result<String, Error> {
    let t = text.trim();
    if t.is_empty() {
        return Err(Error::Invalid(format!("{what} needs a note")));
    }
    if t.len() > MAX_NOTE {
        return Err(Error::Invalid(format!("{what}: a note is at most {MAX_NOTE} bytes")));
    }
    Ok(t.to_string())
}
