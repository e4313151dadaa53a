//! FHIR R4 JSON rules for Valv, free of I/O and of the clock.
//!
//! What lives here: which resource types exist and how their JSON is shaped ([`r4`]), resource ids
//! and references, which patient compartment a resource belongs to ([`compartment`]), the search
//! parameters Valv supports and how values are extracted, normalised and matched ([`search`],
//! [`date`]), Bundle handling ([`bundle`]), PATCH documents ([`patch`]), OperationOutcome ([`outcome`]) and the
//! CapabilityStatement ([`capability`]). Time and randomness come in as arguments.

pub mod bundle;
pub mod capability;
pub mod compartment;
pub mod date;
pub mod fhirpatch;
mod error;
pub mod id;
pub mod members;
pub mod number;
pub mod outcome;
pub mod patch;
pub mod r4;
pub mod reference;
pub mod search;
#[cfg(test)]
mod search_kinds_tests;

pub use error::{FhirError, IssueCode};
