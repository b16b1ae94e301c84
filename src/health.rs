//! A service's health as its checks see it: a run of failed checks makes it
//! unhealthy, one passing check makes it healthy again. Pure: the agent's
//! actor dials, this counts.

/// The verdict of one service's checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    /// Failed checks in a row that make the service unhealthy.
    needed: u32,
    failures: u32,
    healthy: bool,
}

impl HealthState {
    /// Healthy until `needed` checks in a row fail (at least one).
    pub fn new(needed: u32) -> Self {
        Self {
            needed: needed.max(1),
            failures: 0,
            healthy: true,
        }
    }

    /// Whether the service counts as healthy.
    pub fn is_healthy(&self) -> bool {
        self.healthy
    }

    /// Records a check; the new verdict when it changed.
    pub fn record(&mut self, passed: bool) -> Option<bool> {
        self.failures = if passed {
            0
        } else {
            self.failures.saturating_add(1)
        };
        let healthy = self.failures < self.needed;
        (healthy != self.healthy).then(|| {
            self.healthy = healthy;
            healthy
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_failures_makes_it_unhealthy_and_one_pass_healthy() {
        let mut state = HealthState::new(3);
        assert_eq!(state.record(false), None);
        assert_eq!(state.record(true), None, "a pass resets the run");
        assert_eq!(state.record(false), None);
        assert_eq!(state.record(false), None);
        assert_eq!(state.record(false), Some(false));
        assert!(!state.is_healthy());
        assert_eq!(state.record(false), None, "said once");
        assert_eq!(state.record(true), Some(true));
        assert_eq!(state.record(true), None);
        assert_eq!(
            HealthState::new(0).record(false),
            Some(false),
            "at least one"
        );
    }
}
