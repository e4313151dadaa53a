//! What belongs to the connection and the HTTP layer: limits on what a client can hold
//! (connections, bodies, rates), response bodies (whole or streamed), TLS configuration, metrics, query strings.

pub mod body;
pub mod limits;
pub mod metrics;
pub mod query;
pub mod tls;
