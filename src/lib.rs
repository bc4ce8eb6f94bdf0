//! volumed: the volume daemon of a VM-migration appliance. It attaches
//! volumes on request (AMQP), finds their block devices, records every
//! outcome in PostgreSQL with its completion event (transactional outbox),
//! and publishes the events.

pub mod amqp;
pub mod backend;
pub mod bench;
pub mod cli;
pub mod client;
pub mod cloudstack;
pub mod config;
pub mod consumer;
pub mod contract;
pub mod daemon;
pub mod db;
pub mod device;
pub mod dispatcher;
pub mod dlq;
pub mod failpoint;
pub mod gate;
pub mod group;
pub mod health;
pub mod http;
pub mod metrics;
pub mod nbd;
pub mod plot;
pub mod reconcile;
pub mod relay;
pub mod systemd;
pub mod telemetry;
pub mod topology;
pub mod trace;
pub mod worker;
