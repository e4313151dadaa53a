//! People and services: credentials to principals (`auth`), accounts and sign-in (`identity`),
//! single sign-on (`oidc`), and the `/auth/*` and `/admin/users` endpoints (`api`).

pub mod api;
pub mod auth;
pub mod identity;
pub mod oidc;
