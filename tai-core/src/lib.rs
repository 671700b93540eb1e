//! # tai-core
//!
//! TAI is a framework for services that turn a request (a **Signal**) into a decision (a
//! **Policy**) and a carried-out effect (an **Action**), with the Toyota Production System built
//! in. A tour of the crate, in the order a request meets it:
//!
//! - [`runtime`] starts a service: configuration, logging, the common routes (`/health`,
//!   `/ready`, `/metrics`, `/status`, `/andon`, `/`, `/openapi.json`), request ids and
//!   `traceparent`, body limits, timeouts, Stripe-shaped JSON errors, API-key auth and graceful
//!   shutdown.
//! - [`heijunka`] levels the load at the edge: keyed GCRA rate limits and sliding-window counts.
//! - [`pipeline`] runs facts -> [`policy`] -> action, each step traced and measured.
//! - [`jidoka`] stops the line: a circuit breaker around every dependency an action calls.
//! - [`kanban`] moves follow-up work through bounded queues with acks and redelivery.
//! - [`kaizen`] measures: Prometheus metrics and rolling windows.
//! - [`andon`] shows: GREEN / YELLOW / RED from thresholds over Kaizen's figures.
//! - [`audit`] publishes every decision and transition (JetStream when configured).
//! - [`store`] and [`secrets`] hold state and secrets behind traits, memory and environment by
//!   default; [`clock`] makes time injectable so all of the above is tested without sleeping.

#![warn(missing_docs, unreachable_pub, missing_debug_implementations)]

pub mod andon;
pub mod audit;
pub mod backend;
pub mod clock;
pub mod db;
pub mod heijunka;
pub mod jidoka;
pub mod kaizen;
pub mod kanban;
pub mod lease;
pub mod outbox;
pub mod pipeline;
pub mod policy;
pub mod runtime;
pub mod secrets;
pub mod store;
pub mod supervisor;
