//! Apache CloudStack: request signing, the API client, and an emulator of
//! the API for tests and local trials (no real CloudStack can run here).

pub mod client;
pub mod emulator;
pub mod sign;
