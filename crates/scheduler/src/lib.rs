//! The scheduler (DESIGN.md §4 "Bids and clearing"): who gets to exist each round.
//!
//! [`clearing`] is the round itself as a pure function; the service around it (bids in escrow,
//! rounds cleared exactly once, settlement) builds on it.

pub mod clearing;
