//! The market (DESIGN.md §4 "Resources and bundles"): what a round sells and at what price.
//!
//! [`pricing`] holds the pure rules — a bundle's reserve value, utilisation, and the pluggable
//! price rules applied after each round; the service around them builds on it.

pub mod pricing;
