//! Black-box tests: the built binaries, real backends, HTTP only.

mod foundation;
mod payment;
