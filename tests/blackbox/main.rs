//! Black-box tests: the built binaries, real backends, HTTP only.

mod backends;
mod chaos;
mod contract;
mod deployment;
mod foundation;
mod lifecycle;
mod operator;
mod payment;
mod platform;
mod queues;
mod quickstart;
mod record;
mod rollout;
mod safety;
mod signal;
