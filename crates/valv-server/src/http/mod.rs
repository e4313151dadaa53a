//! What belongs to the connection and the HTTP layer: limits on what a client can hold
//! (connections, bodies, rates), response bodies (whole or streamed), TLS configuration, metrics, query strings,
//! and the outbound HTTPS client.

pub mod body;
pub mod client;
pub mod limits;
pub mod metrics;
pub mod query;
pub mod tls;
