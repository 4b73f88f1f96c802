//! Host-side addresses: the pool is carved into /30s, one per sandbox (host end, namespace end).

use std::net::Ipv4Addr;
use std::str::FromStr;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PoolError {
    #[error("invalid address pool {0:?}: expected an IPv4 CIDR such as 10.240.0.0/16")]
    Invalid(String),
    #[error("address pool {0} is too small: it needs at least a /29")]
    TooSmall(String),
    #[error("slot {slot} is outside the address pool ({capacity} slots)")]
    OutOfRange { slot: u32, capacity: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressPool {
    base: u32,
    prefix: u8,
}

impl FromStr for AddressPool {
    type Err = PoolError;
    fn from_str(s: &str) -> Result<Self, PoolError> {
        let (addr, prefix) = s.split_once('/').ok_or_else(|| PoolError::Invalid(s.to_owned()))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| PoolError::Invalid(s.to_owned()))?;
        let prefix: u8 = prefix.parse().map_err(|_| PoolError::Invalid(s.to_owned()))?;
        if prefix > 29 {
            return Err(PoolError::TooSmall(s.to_owned()));
        }
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
        Ok(Self { base: u32::from(addr) & mask, prefix })
    }
}

impl std::fmt::Display for AddressPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

impl AddressPool {
    /// Usable slots; slot 0 (holding the pool's network address) is never handed out.
    pub fn capacity(&self) -> u32 {
        ((1u64 << (32 - self.prefix)) / 4 - 1) as u32
    }

    pub fn net(&self) -> crate::Ipv4Net {
        crate::Ipv4Net { addr: Ipv4Addr::from(self.base), prefix: self.prefix }
    }

    /// (host end, namespace end) of slot `slot`, counted from 1.
    pub fn slot(&self, slot: u32) -> Result<(Ipv4Addr, Ipv4Addr), PoolError> {
        if slot == 0 || slot > self.capacity() {
            return Err(PoolError::OutOfRange { slot, capacity: self.capacity() });
        }
        let net = self.base + slot * 4;
        Ok((Ipv4Addr::from(net + 1), Ipv4Addr::from(net + 2)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carves_slash30s() {
        let pool: AddressPool = "10.240.0.0/16".parse().unwrap();
        assert_eq!(pool.capacity(), 16383);
        assert_eq!(pool.slot(1).unwrap(), (Ipv4Addr::new(10, 240, 0, 5), Ipv4Addr::new(10, 240, 0, 6)));
        assert_eq!(pool.slot(16383).unwrap().1, Ipv4Addr::new(10, 240, 255, 254));
        assert!(pool.slot(0).is_err());
        assert!(pool.slot(16384).is_err());
    }

    #[test]
    fn rejects_bad_pools() {
        assert!("10.0.0.0".parse::<AddressPool>().is_err());
        assert!("10.0.0.0/30".parse::<AddressPool>().is_err());
        assert!("banana/16".parse::<AddressPool>().is_err());
        assert_eq!("10.1.2.3/24".parse::<AddressPool>().unwrap().to_string(), "10.1.2.0/24");
    }
}
