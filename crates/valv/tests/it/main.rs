//! Integration tests: each starts the real `valv` binary in a temporary data directory.
//! One test binary for the whole crate keeps link time down.

mod access;
mod awskms;
mod audit;
mod backup;
mod auditprivacy;
mod auditsearch;
mod bulk;
mod bundles;
mod clients;
mod conditional;
mod crud;
mod disk;
mod erase;
mod errors;
mod examples;
mod exhaustion;
mod export;
mod facts;
mod files;
mod failover;
mod faults;
mod harness;
mod holes;
mod identity;
mod independent;
mod keys;
mod mtls;
mod oidc;
mod patch;
mod results;
mod pkcs11;
mod search;
mod security;
mod servers;
mod siem;
