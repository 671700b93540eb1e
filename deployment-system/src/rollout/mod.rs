//! The rollout engine, split by job:
//!
//! - [`model`]: the persisted shape of a deployment, and [`transitions`]: every change of it as
//!   a pure method taking `now`;
//! - [`gate`]: the health gate, a tai-core `Policy` over a measurement and the stage's counts;
//! - [`lanes`]: one queue per (region, service) in store-issued arrival order, with supersede;
//! - [`measure`]: measurements in their own tasks, behind a breaker per provider and a timeout;
//! - [`traffic`]: the platform driven level-triggered, fenced by the lease's token, until the
//!   platform is seen serving what was asked;
//! - [`handle`]: the operator's handle; [`replica`]: standbys, sync and forwarded commands;
//! - [`controller`]: the loop that ties them together while this replica holds the lease
//!   (tai-core's [`tai_core::lease::Lease`]).

pub mod controller;
pub mod gate;
pub mod handle;
pub mod lanes;
pub mod measure;
pub mod model;
mod operations;
mod replica;
pub mod traffic;
pub mod transitions;
mod upkeep;

#[cfg(test)]
mod tests;

pub use controller::{Controller, Parts};
pub use handle::{Command, ControllerHandle, Op, OpError};
pub use model::{Deployment, RegionRollout, RegionStatus, Status};
