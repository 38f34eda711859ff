//! Command-line tools that speak the Kafka protocol through librdkafka.

pub mod consume;
pub mod produce;
pub mod topic;
