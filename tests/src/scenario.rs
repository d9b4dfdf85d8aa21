//! Standard addresses and specs shared by the kernel tests and the
//! benchmark, all from 198.18.0.0/15 and 2001:db8::/32.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_userspace::model::{
    BackendSpec, BackendState, DataplaneSpec, ForwardingMode, HashMode, Ipv4Prefix, Ipv6Prefix,
    MacAddr, Protocol, VipSpec,
};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
pub const NOT_VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);
pub const IPIP_SRC_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 0);
pub const IPIP_SRC_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0);
pub const SEED: u32 = 0x5eed_1b00;

/// MAC of backend `i` (DSR).
pub fn backend_mac(i: u8) -> [u8; 6] {
    [0x02, 0xbe, 0, 0, 0, i]
}

/// IPv4 address of backend `i`.
pub fn backend_v4(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, i)
}

/// IPv6 address of backend `i`.
pub fn backend_v6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, u16::from(i))
}

/// `n` equally weighted active backends in the VIP's family.
pub fn backends(n: u8, v6: bool) -> Vec<BackendSpec> {
    (1..=n)
        .map(|i| BackendSpec {
            address: if v6 {
                IpAddr::V6(backend_v6(i))
            } else {
                IpAddr::V4(backend_v4(i))
            },
            weight: 100,
            mac: Some(MacAddr(backend_mac(i))),
            state: BackendState::Active,
        })
        .collect()
}

/// A VIP with `n` backends.
pub fn vip(address: IpAddr, port: u16, protocol: Protocol, mode: ForwardingMode, n: u8) -> VipSpec {
    VipSpec {
        address,
        port,
        protocol,
        mode,
        hash: HashMode::FiveTuple,
        table_size: lb_common::DEFAULT_RING_SIZE,
        backends: backends(n, address.is_ipv6()),
    }
}

/// A spec with the outer-source prefixes set and the given VIPs.
pub fn spec(vips: Vec<VipSpec>) -> DataplaneSpec {
    DataplaneSpec {
        hash_seed: SEED,
        ipip_source_v4: Some(Ipv4Prefix {
            addr: IPIP_SRC_V4,
            len: 24,
        }),
        ipip_source_v6: Some(Ipv6Prefix {
            addr: IPIP_SRC_V6,
            len: 96,
        }),
        ipip_mtu: lb_common::DEFAULT_IPIP_MTU,
        generation: 1,
        vips,
    }
}

/// The standard set: TCP and UDP VIPs on IPv4 and IPv6 in DSR mode (port
/// 80 / 53), and IP-in-IP VIPs on port 8080, each with `n` backends.
pub fn standard(n: u8) -> DataplaneSpec {
    let v4 = IpAddr::V4(VIP_V4);
    let v6 = IpAddr::V6(VIP_V6);
    spec(vec![
        vip(v4, 80, Protocol::Tcp, ForwardingMode::Dsr, n),
        vip(v4, 53, Protocol::Udp, ForwardingMode::Dsr, n),
        vip(v6, 80, Protocol::Tcp, ForwardingMode::Dsr, n),
        vip(v6, 53, Protocol::Udp, ForwardingMode::Dsr, n),
        vip(v4, 8080, Protocol::Tcp, ForwardingMode::Ipip, n),
        vip(v6, 8080, Protocol::Tcp, ForwardingMode::Ipip, n),
    ])
}
