#![doc = include_str!("../README.md")]

pub mod alerts;
pub mod bench;
pub mod cli;
pub mod demo;
pub mod job;
pub mod kinds;
pub mod maintenance;
pub mod metrics;
pub mod schema;
pub mod shutdown;
pub mod store;
pub mod wake;
pub mod web;
pub mod worker;

pub use job::{Backoff, Handler, JobContext, Outcome, Registry};
pub use store::{Job, JobState, NewJob, Store};
pub use worker::{Worker, WorkerConfig};
