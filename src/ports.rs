//! The public port pool: an inclusive range, lowest-free assignment, explicit
//! requests honoured or refused (never swapped), idempotent release.

/// Why a port could not be allocated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// The range is empty or starts at 0.
    #[error("invalid port range {low}-{high}: need 1 <= low <= high")]
    InvalidRange {
        /// First port.
        low: u16,
        /// Last port.
        high: u16,
    },
    /// Every port of the range is in use.
    #[error("no ports available in {low}-{high}")]
    Exhausted {
        /// First port.
        low: u16,
        /// Last port.
        high: u16,
    },
    /// The requested port is in use.
    #[error("port {0} is already in use")]
    Taken(u16),
    /// None of the ports a token may use is free (or in the range).
    #[error("no free port among those this token may use ({ranges})")]
    NoneAllowed {
        /// The token's ports, as `low-high` ranges.
        ranges: String,
    },
    /// The requested port is outside the range.
    #[error("port {port} is outside the range {low}-{high}")]
    OutOfRange {
        /// The port requested.
        port: u16,
        /// First port.
        low: u16,
        /// Last port.
        high: u16,
    },
}

/// Ports of an inclusive range, each free or in use.
#[derive(Debug, Clone)]
pub struct PortPool {
    low: u16,
    high: u16,
    used: Vec<bool>,
    in_use: usize,
}

impl PortPool {
    /// A pool over `low..=high` (a single port when equal).
    pub fn new((low, high): (u16, u16)) -> Result<Self, PortError> {
        if low == 0 || low > high {
            return Err(PortError::InvalidRange { low, high });
        }
        let size = usize::from(high - low) + 1;
        Ok(Self {
            low,
            high,
            used: vec![false; size],
            in_use: 0,
        })
    }

    /// The range, inclusive.
    pub fn range(&self) -> (u16, u16) {
        (self.low, self.high)
    }

    /// Allocates `requested`, or the lowest free port when it is 0.
    pub fn allocate(&mut self, requested: u16) -> Result<u16, PortError> {
        let index = if requested == 0 {
            self.lowest_free()?
        } else {
            self.index_of(requested)?
        };
        if self.used[index] {
            return Err(PortError::Taken(requested));
        }
        self.used[index] = true;
        self.in_use += 1;
        Ok(self.port_at(index))
    }

    /// Allocates `requested` if `allowed` holds it, or, when it is 0, the
    /// lowest free port that `allowed` (inclusive ranges) holds.
    pub fn allocate_within(
        &mut self,
        requested: u16,
        allowed: &[(u16, u16)],
    ) -> Result<u16, PortError> {
        let none_allowed = || PortError::NoneAllowed {
            ranges: format_ranges(allowed),
        };
        if requested != 0 {
            if !in_ranges(allowed, requested) {
                return Err(none_allowed());
            }
            return self.allocate(requested);
        }
        let index = (0..self.used.len())
            .find(|&i| !self.used[i] && in_ranges(allowed, self.port_at(i)))
            .ok_or_else(none_allowed)?;
        self.allocate(self.port_at(index))
    }

    /// Returns `port` to the pool; true if it was in use. Releasing twice is harmless.
    pub fn release(&mut self, port: u16) -> bool {
        let Ok(index) = self.index_of(port) else {
            return false;
        };
        let was_used = std::mem::replace(&mut self.used[index], false);
        self.in_use -= usize::from(was_used);
        was_used
    }

    /// True when `port` is in the range and free.
    pub fn is_available(&self, port: u16) -> bool {
        self.index_of(port).is_ok_and(|i| !self.used[i])
    }

    /// Number of free ports.
    pub fn available(&self) -> usize {
        self.used.len() - self.in_use
    }

    fn lowest_free(&self) -> Result<usize, PortError> {
        self.used
            .iter()
            .position(|used| !used)
            .ok_or(PortError::Exhausted {
                low: self.low,
                high: self.high,
            })
    }

    fn index_of(&self, port: u16) -> Result<usize, PortError> {
        if port < self.low || port > self.high {
            return Err(PortError::OutOfRange {
                port,
                low: self.low,
                high: self.high,
            });
        }
        Ok(usize::from(port - self.low))
    }

    fn port_at(&self, index: usize) -> u16 {
        // invariant: index < used.len() = high - low + 1, so low + index <= high
        self.low + index as u16
    }
}

/// Whether one of the inclusive `ranges` holds `port`.
pub fn in_ranges(ranges: &[(u16, u16)], port: u16) -> bool {
    ranges
        .iter()
        .any(|&(low, high)| (low..=high).contains(&port))
}

/// `ranges` as `low-high` (or `port`), comma-separated; `none` when empty.
pub fn format_ranges(ranges: &[(u16, u16)]) -> String {
    if ranges.is_empty() {
        return "none".to_owned();
    }
    let parts: Vec<String> = ranges
        .iter()
        .map(|&(low, high)| {
            if low == high {
                low.to_string()
            } else {
                format!("{low}-{high}")
            }
        })
        .collect();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_gets_the_lowest_free_port_it_holds_and_nothing_else() {
        let mut pool = PortPool::new((100, 110)).unwrap();
        let scope = [(103, 104), (108, 108)];
        assert_eq!(pool.allocate_within(0, &scope), Ok(103));
        assert_eq!(pool.allocate_within(0, &scope), Ok(104));
        assert_eq!(pool.allocate_within(108, &scope), Ok(108));
        let none = pool.allocate_within(0, &scope).unwrap_err();
        assert_eq!(
            none.to_string(),
            "no free port among those this token may use (103-104, 108)"
        );
        assert!(matches!(
            pool.allocate_within(100, &scope),
            Err(PortError::NoneAllowed { .. })
        ));
        assert!(matches!(
            pool.allocate_within(0, &[(200, 300)]),
            Err(PortError::NoneAllowed { .. })
        ));
        assert_eq!(
            pool.allocate(0),
            Ok(100),
            "outside a scope, the pool is unchanged"
        );
        assert!(pool.release(103));
        assert_eq!(pool.allocate_within(0, &scope), Ok(103));
    }

    #[test]
    fn zero_takes_the_lowest_free_port() {
        let mut pool = PortPool::new((100, 102)).unwrap();
        assert_eq!(pool.allocate(0), Ok(100));
        assert_eq!(pool.allocate(102), Ok(102));
        assert_eq!(pool.allocate(0), Ok(101));
        assert_eq!(
            pool.allocate(0),
            Err(PortError::Exhausted {
                low: 100,
                high: 102
            })
        );
        assert!(pool.release(100));
        assert_eq!(pool.allocate(0), Ok(100));
    }

    #[test]
    fn single_port_range() {
        let mut pool = PortPool::new((21011, 21011)).unwrap();
        assert_eq!(pool.available(), 1);
        assert_eq!(pool.allocate(21011), Ok(21011));
        assert_eq!(pool.allocate(21011), Err(PortError::Taken(21011)));
        assert_eq!(pool.available(), 0);
    }

    #[test]
    fn explicit_requests_are_never_swapped() {
        let mut pool = PortPool::new((100, 200)).unwrap();
        assert_eq!(pool.allocate(150), Ok(150));
        assert_eq!(pool.allocate(150), Err(PortError::Taken(150)));
        assert_eq!(
            pool.allocate(99),
            Err(PortError::OutOfRange {
                port: 99,
                low: 100,
                high: 200
            })
        );
        assert_eq!(
            pool.allocate(201),
            Err(PortError::OutOfRange {
                port: 201,
                low: 100,
                high: 200
            })
        );
    }

    #[test]
    fn release_is_idempotent() {
        let mut pool = PortPool::new((1, 65535)).unwrap();
        assert_eq!(pool.allocate(65535), Ok(65535));
        assert!(pool.release(65535));
        assert!(!pool.release(65535));
        assert!(!pool.release(7)); // never allocated
        assert_eq!(pool.available(), 65535);
        assert!(pool.is_available(65535));
    }

    #[test]
    fn invalid_ranges_are_refused() {
        assert!(PortPool::new((0, 10)).is_err());
        assert!(PortPool::new((10, 9)).is_err());
    }
}
