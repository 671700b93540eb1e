//! The rollout: a persisted state machine per region, driven by one controller.
//!
//! [`model`] is the shape stored before every transition takes effect; [`controller`] is the
//! reconcile loop that moves every active deployment forward on absolute deadlines, grants
//! regions one rollout at a time in arrival order (the Kanban queue), runs the health gates, and
//! rolls back on a failed gate.

pub mod controller;
pub mod model;

pub use controller::{Command, Controller, ControllerHandle, OpError};
pub use model::{Deployment, RegionRollout, RegionStatus, Status};
