//! Indexes of the global counters (`Counters::global` of
//! [`crate::MAP_COUNTERS`]) and of the decap program's counters
//! ([`crate::MAP_DECAP_STATS`]).
//!
//! Every packet the load balancer sees increments exactly one *outcome*
//! counter (`STAT_PASS_*`, `STAT_TX`, `STAT_REDIRECT`, `STAT_DROP_*`), so the
//! outcome counters add up to the packets received. The other counters
//! (connection table, fragments, ICMP) are extra detail.
//!
//! Drop-or-pass rule for bad packets: a packet the program cannot prove is
//! for a VIP is passed to the kernel untouched (the kernel's own checks
//! handle it, and the host's own traffic is never at risk); a packet that
//! *is* for a VIP but whose transport header is truncated or malformed is
//! dropped.

macro_rules! counters {
    ($count:ident, $names:ident; $($(#[$doc:meta])* $name:ident = $label:literal,)*) => {
        counters!(@each 0u32; $($(#[$doc])* $name,)*);
        /// Number of counters.
        pub const $count: u32 = [$($label),*].len() as u32;
        /// Stable names (metrics labels), in index order.
        pub const $names: [&str; $count as usize] = [$($label),*];
    };
    (@each $n:expr; $(#[$doc:meta])* $name:ident, $($rest:tt)*) => {
        $(#[$doc])*
        pub const $name: u32 = $n;
        counters!(@each $n + 1; $($rest)*);
    };
    (@each $n:expr;) => {};
}

counters! {
    STAT_COUNT, STAT_NAMES;
    /// Outcome: not IPv4/IPv6 (ARP, LLDP, unknown EtherType).
    STAT_PASS_NON_IP = "pass_non_ip",
    /// Outcome: IP traffic not addressed to a VIP.
    STAT_PASS_NOT_VIP = "pass_not_vip",
    /// Outcome: truncated or malformed L2/L3 header, passed to the kernel.
    STAT_PASS_MALFORMED = "pass_malformed",
    /// Outcome: VIP traffic in a frame not addressed to this interface's MAC
    /// (unicast to another host, broadcast, multicast; or the agent has not
    /// told the program its MAC yet): passed, never forwarded.
    STAT_PASS_OTHER_HOST = "pass_other_host",
    /// Outcome: forwarded with XDP_TX.
    STAT_TX = "tx",
    /// Outcome: forwarded with XDP_REDIRECT.
    STAT_REDIRECT = "redirect",
    /// Outcome: too big for the path to its IP-in-IP backend: answered with
    /// ICMP "fragmentation needed" / ICMPv6 "packet too big" from the VIP
    /// (XDP_TX back to the sender).
    STAT_TX_ICMP_TOO_BIG = "tx_icmp_too_big",
    /// Outcome: VIP traffic with a truncated or malformed transport header.
    STAT_DROP_MALFORMED_L4 = "drop_malformed_l4",
    /// Outcome: the VIP has no backend (empty or missing lookup table).
    STAT_DROP_NO_BACKEND = "drop_no_backend",
    /// Outcome: the route lookup for an encapsulated packet failed (no
    /// route, no neighbour entry, forwarding off; never "too big").
    STAT_DROP_NO_ROUTE = "drop_no_route",
    /// Outcome: too big for the path to its IP-in-IP backend and not
    /// answered with an ICMP error: IPv4 without DF (or a fragment), an ICMP
    /// error itself, a sender address that is not unicast, or, with an
    /// egress MTU below 596, shorter than the ICMP quote.
    STAT_DROP_TOO_BIG = "drop_too_big",
    /// Outcome: too big, and the ICMP error was not sent because of the
    /// per-CPU rate limit.
    STAT_DROP_TOO_BIG_RATE_LIMITED = "drop_too_big_rate_limited",
    /// Outcome: VIP traffic for IP-in-IP whose IPv4 total length or IPv6
    /// payload length claims more bytes than the frame holds.
    STAT_DROP_BAD_LENGTH = "drop_bad_length",
    /// Outcome: growing the packet for encapsulation failed.
    STAT_DROP_ENCAP = "drop_encap",
    /// Outcome: the egress interface is not in the egress map.
    STAT_DROP_REDIRECT = "drop_redirect",
    /// Outcome: the global config is missing (agent not ready).
    STAT_DROP_NO_CONFIG = "drop_no_config",
    /// Detail: established flow found in the connection table.
    STAT_CONN_HIT = "conn_hit",
    /// Detail: no connection entry, backend chosen from the lookup table.
    STAT_CONN_MISS = "conn_miss",
    /// Detail: connection entry pointed at a backend that is gone (or, by a
    /// tag collision, at one of another VIP); the flow is picked afresh.
    STAT_CONN_STALE = "conn_stale",
    /// Detail: the connection table could not be read (a missing map): the
    /// flow was forwarded by its lookup-table pick and not recorded.
    STAT_CONN_INSERT_FAIL = "conn_insert_fail",
    /// Detail: IP fragment of VIP traffic (hashed on addresses and protocol
    /// only), sent on to a backend; not a new flow.
    STAT_FRAGMENT = "fragment",
    /// Detail: ICMP "fragmentation needed" / ICMPv6 "packet too big" to a
    /// VIP about one of its own flows, sent on to that flow's backend; not a
    /// new flow.
    STAT_ICMP_PTB = "icmp_ptb",
    /// Detail: ICMP "fragmentation needed" / ICMPv6 "packet too big" about
    /// a VIP flow that is not addressed to that VIP (another VIP, or an
    /// address that only shares the VIP prefilter's bit): passed untouched.
    STAT_ICMP_NOT_OWN_FLOW = "icmp_not_own_flow",
    /// Detail: packet carried an 802.1Q/802.1ad tag.
    STAT_VLAN = "vlan",
    /// Parse error: Ethernet or VLAN header truncated.
    STAT_ERR_L2_TRUNC = "err_l2_truncated",
    /// Parse error: IPv4 header truncated.
    STAT_ERR_IPV4_TRUNC = "err_ipv4_truncated",
    /// Parse error: IPv4 IHL < 5, version not 4, or total length invalid.
    STAT_ERR_IPV4_BAD = "err_ipv4_bad_header",
    /// Parse error: IPv6 EtherType with a version other than 6.
    STAT_ERR_IPV6_BAD = "err_ipv6_bad_header",
    /// Parse error: IPv6 header or extension header truncated.
    STAT_ERR_IPV6_TRUNC = "err_ipv6_truncated",
    /// Parse error: more IPv6 extension headers than the parser follows.
    STAT_ERR_IPV6_EXT_LIMIT = "err_ipv6_ext_limit",
    /// Parse error: transport header truncated.
    STAT_ERR_L4_TRUNC = "err_l4_truncated",
    /// Parse error: quoted header inside an ICMP error truncated.
    STAT_ERR_ICMP_INNER = "err_icmp_inner_truncated",
}

/// The outcome counters: every packet increments exactly one of these.
pub const STAT_OUTCOMES: [u32; 16] = [
    STAT_PASS_NON_IP,
    STAT_PASS_NOT_VIP,
    STAT_PASS_MALFORMED,
    STAT_PASS_OTHER_HOST,
    STAT_TX,
    STAT_REDIRECT,
    STAT_TX_ICMP_TOO_BIG,
    STAT_DROP_MALFORMED_L4,
    STAT_DROP_NO_BACKEND,
    STAT_DROP_NO_ROUTE,
    STAT_DROP_TOO_BIG,
    STAT_DROP_TOO_BIG_RATE_LIMITED,
    STAT_DROP_BAD_LENGTH,
    STAT_DROP_ENCAP,
    STAT_DROP_REDIRECT,
    STAT_DROP_NO_CONFIG,
];

counters! {
    DECAP_STAT_COUNT, DECAP_STAT_NAMES;
    /// IPv4-in-IPv4 packet decapsulated and passed up.
    DECAP_V4 = "decap_ipip",
    /// IPv6-in-IPv6 packet decapsulated and passed up.
    DECAP_V6 = "decap_ip6ip6",
    /// Not encapsulated: passed untouched.
    DECAP_PASS = "pass",
    /// Encapsulated but truncated or malformed: dropped.
    DECAP_DROP_MALFORMED = "drop_malformed",
}
