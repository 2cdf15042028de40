//! Life and death (DESIGN.md §4): an agent's status from what it has, without I/O.

use syntropism_contracts::pb::AgentStatus;

/// What decides an agent's status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Facts {
    /// A window of it is open (created or running).
    pub running: bool,
    /// A pending bid of it is due now (no `not_before`, or one that has passed).
    pub pending_due: bool,
    /// A pending bid of it waits for its `not_before`.
    pub scheduled: bool,
    /// Its available balance (µcr).
    pub available_micros: i64,
    /// The reserve value of the cheapest possible bundle (µcr).
    pub cheapest_micros: i64,
}

/// Alive: a running execution or a pending bid. Dormant: neither, but a scheduled bid, or
/// enough credits that a bid (its own, or a sponsor's) may still wake it. Dead: nothing left
/// to wake it and less than the cheapest window costs.
pub fn status(facts: Facts) -> AgentStatus {
    if facts.running || facts.pending_due {
        AgentStatus::Alive
    } else if facts.scheduled || facts.available_micros >= facts.cheapest_micros {
        AgentStatus::Dormant
    } else {
        AgentStatus::Dead
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BROKE: Facts = Facts {
        running: false,
        pending_due: false,
        scheduled: false,
        available_micros: 9,
        cheapest_micros: 10,
    };

    #[test]
    fn each_rule() {
        assert_eq!(status(BROKE), AgentStatus::Dead);
        assert_eq!(
            status(Facts {
                running: true,
                ..BROKE
            }),
            AgentStatus::Alive
        );
        assert_eq!(
            status(Facts {
                pending_due: true,
                ..BROKE
            }),
            AgentStatus::Alive
        );
        assert_eq!(
            status(Facts {
                scheduled: true,
                ..BROKE
            }),
            AgentStatus::Dormant
        );
        assert_eq!(
            status(Facts {
                available_micros: 10,
                ..BROKE
            }),
            AgentStatus::Dormant
        );
    }
}
