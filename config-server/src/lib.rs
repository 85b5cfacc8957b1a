//! The configuration server: registration and certificates, inventory, policies, the protection
//! lifecycle, jobs and the REST API that drives them.

pub mod lifecycle;
