//! Black-box tests: the built binaries, real backends, HTTP only.

mod deployment;
mod foundation;
mod payment;
mod store;
