//! Table-driven `BPF_PROG_TEST_RUN` fixtures against the real compiled
//! object (`xdp_lb` and `xdp_decap`).
//!
//! Every fixture is one packet built with [`PacketBuilder`] and an exact
//! expectation: the XDP action, the output bytes (or, for IP-in-IP, decoded
//! fields *and* the exact bytes), the delta of **every** global counter (the
//! listed ones must move by the listed amount, all others must not move) and
//! the per-VIP / per-backend traffic counters (the named VIP and backend move
//! by one packet of the input's length, every other one stays put).
//!
//! The expected backend is never read from the kernel: it is computed from
//! the plan (`ring[ring_slot(flow_hash(key, seed), ring_size)]`), which
//! cross-checks the kernel against userspace.
//!
//! Fixtures of a group run in order on one loaded object, so a group can be
//! a story (SYN, table change, ACK ...). A fixture may first apply another
//! plan or allow an egress interface (`Fixture::before`). Each group is one
//! `#[test]`: it prints every fixture's name and result and panics at the
//! end with the list of failed fixtures and why.
//!
//! IP-in-IP needs a route (`bpf_fib_lookup` runs in the network namespace of
//! the ingress device), so the `ipip` group runs in its own namespace (see
//! [`Netns`]) on a dedicated thread that `setns()`es into it; the namespace
//! is deleted when the guard drops, also on panic.

// Fixture tables are long by nature, and flows are named after what they
// are (tcp4, tcp6, ...).
#![allow(
    clippy::too_many_lines,
    clippy::similar_names,
    clippy::many_single_char_names
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::Instant,
};

use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use lb_common::{
    DECAP_DROP_MALFORMED, DECAP_PASS, DECAP_STAT_NAMES, DECAP_V4, DECAP_V6, FlowKey, STAT_CONN_HIT,
    STAT_CONN_MISS, STAT_CONN_STALE, STAT_DROP_BAD_LENGTH, STAT_DROP_MALFORMED_L4,
    STAT_DROP_NO_BACKEND, STAT_DROP_NO_ROUTE, STAT_DROP_REDIRECT, STAT_DROP_TOO_BIG,
    STAT_ERR_ICMP_INNER, STAT_ERR_IPV4_BAD, STAT_ERR_IPV4_TRUNC, STAT_ERR_IPV6_BAD,
    STAT_ERR_IPV6_EXT_LIMIT, STAT_ERR_IPV6_TRUNC, STAT_ERR_L2_TRUNC, STAT_ERR_L4_TRUNC,
    STAT_FRAGMENT, STAT_ICMP_NOT_OWN_FLOW, STAT_ICMP_PTB, STAT_NAMES, STAT_OUTCOMES,
    STAT_PASS_MALFORMED, STAT_PASS_NON_IP, STAT_PASS_NOT_VIP, STAT_PASS_OTHER_HOST, STAT_REDIRECT,
    STAT_TX, STAT_TX_ICMP_TOO_BIG, STAT_VLAN, TrafficCounters, VIP_F_SRC_AFFINITY, flow_hash,
    ring_slot, vip_filter_bit,
};
use lb_tests::{
    packet::{
        self, ETHERTYPE_ARP, ExtHeader, Mac, PacketBuilder, TcpFlags, decode, encap_ip,
        flow_key_v4, flow_key_v6,
    },
    scenario::{
        self, CLIENT_MAC, CLIENT_V4, CLIENT_V6, IPIP_SRC_V4, IPIP_SRC_V6, LB_MAC, NOT_VIP_V4, SEED,
        VIP_V4, VIP_V6, backend_mac, backend_v4, backend_v6,
    },
};
use lb_userspace::{
    datapath::{Datapath, Decap, LoadOptions},
    model::{
        BackendSpec, BackendState, DataplaneSpec, ForwardingMode, HashMode, MacAddr, Protocol,
        VipSpec,
    },
    plan::{self, IdAllocator, MapPlan, PlannedVip},
};

// ===========================================================================
// Constants
// ===========================================================================

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

fn action_name(a: u32) -> &'static str {
    match a {
        0 => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "unknown action",
    }
}

const NOT_VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x99);
/// A router sending ICMP errors about VIP flows.
const ROUTER_MAC: Mac = [0x02, 0, 0, 0, 0, 0x03];
const ROUTER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 4, 1);
const ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 4, 0, 0, 0, 0, 1);
const PAYLOAD: &[u8] = b"fixture payload";

// Extra VIPs of the main (DSR) spec.
const AFFINITY_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 13);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
const ZERO_WEIGHT_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 12);

// Extra VIPs of the IP-in-IP spec.
const NO_NEIGH_VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
const NO_NEIGH_VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x20);
const NO_ROUTE_VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 21);
const FRAG_VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 22);
const REDIR_VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 23);
const REDIR_VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x23);
/// Backends of the IP-in-IP spec that have no neighbour entry / no route.
const NO_NEIGH_BACKEND_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 200);
const NO_NEIGH_BACKEND_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0xc8);
const NO_ROUTE_BACKEND_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 7);
/// Backends reached through the second interface (lbC).
const REDIR_BACKEND_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
const REDIR_BACKEND_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 1);
const REDIR_BACKEND_MAC: Mac = [0x02, 0xbe, 0, 0, 3, 1];
/// IP-in-IP VIPs whose backend's route has MTU 1400 (below the configured
/// 1500): the route lookup, not the config, finds these packets too big.
const SMALL_MTU_VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 24);
const SMALL_MTU_VIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x24);
const SMALL_MTU_BACKEND_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 9);
const SMALL_MTU_BACKEND_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 9);
const SMALL_ROUTE_MTU: u32 = 1400;

// Interfaces of the IP-in-IP namespace.
const LBA: &str = "lbA";
const LBA_MAC: Mac = [0x02, 0x1b, 0, 0, 0, 0x0a];
const LBB_MAC: Mac = [0x02, 0x1b, 0, 0, 0, 0x0b];
const LBC: &str = "lbC";
const LBC_MAC: Mac = [0x02, 0x1c, 0, 0, 0, 0x0c];
const LBD_MAC: Mac = [0x02, 0x1c, 0, 0, 0, 0x0d];

// ===========================================================================
// Fixture types
// ===========================================================================

/// Something to do before a fixture's packet is sent.
enum Before {
    /// `Datapath::apply` another plan.
    Apply(Box<MapPlan>),
    /// `Datapath::set_egress_interfaces` with this interface (by name, in
    /// the group's namespace).
    AllowEgress(&'static str),
}

struct Fixture {
    name: String,
    before: Vec<Before>,
    packet: Vec<u8>,
    /// Bytes the program sees (`xdp_md.data_end`); the rest of `packet` is
    /// a fragment it cannot read. The kernel refuses test inputs shorter
    /// than an Ethernet header, so a 10-byte frame is a 14-byte input of
    /// which the program sees 10.
    linear: Option<usize>,
    expect: Expect,
}

impl Fixture {
    fn new(name: impl Into<String>, packet: Vec<u8>, expect: Expect) -> Self {
        Self {
            name: name.into(),
            before: Vec::new(),
            packet,
            linear: None,
            expect,
        }
    }

    fn linear(mut self, len: usize) -> Self {
        self.linear = Some(len);
        self
    }

    fn after(mut self, before: Before) -> Self {
        self.before.push(before);
        self
    }

    fn after_apply(self, plan: &MapPlan) -> Self {
        self.after(Before::Apply(Box::new(plan.clone())))
    }
}

struct Expect {
    action: u32,
    output: Out,
    /// Global counter deltas (`STAT_*` or `DECAP_*`); every counter not
    /// listed must not move.
    stats: Vec<(u32, u64)>,
    traffic: Traffic,
}

/// What the per-VIP and per-backend counters must do.
enum Traffic {
    /// Not checked.
    Unchecked,
    /// No VIP and no backend counter moves.
    Nothing,
    /// This VIP and this backend each count one packet of the input's length
    /// (and one new flow if `new_flow`); nothing else moves.
    Counted {
        vip: u32,
        backend: u32,
        new_flow: bool,
    },
}

/// The expected output frame.
enum Out {
    /// Output identical to the input.
    Unchanged,
    /// L2 DSR: the input with dst MAC = this, src MAC = the input's dst MAC.
    Dsr { mac: Mac },
    /// IP-in-IP towards a backend.
    Ipip(IpipOut),
    /// Exactly these bytes.
    Exact(Vec<u8>),
}

struct IpipOut {
    backend: IpAddr,
    /// Next hop MAC (the neighbour entry) and the egress interface's MAC.
    dmac: Mac,
    smac: Mac,
    /// The flow hash the outer source and flow label derive from.
    hash: u32,
}

fn ones(stats: &[u32]) -> Vec<(u32, u64)> {
    stats.iter().map(|&s| (s, 1)).collect()
}

/// The backend the plan says a flow goes to.
#[derive(Clone, Debug)]
struct Pick {
    vip_id: u32,
    id: u32,
    addr: IpAddr,
    mac: Mac,
}

impl Expect {
    fn pass(stats: &[u32]) -> Self {
        Self {
            action: XDP_PASS,
            output: Out::Unchanged,
            stats: ones(stats),
            traffic: Traffic::Nothing,
        }
    }

    fn drop(stats: &[u32]) -> Self {
        Self {
            action: XDP_DROP,
            ..Self::pass(stats)
        }
    }

    fn dsr(p: &Pick, new_flow: bool, stats: &[u32]) -> Self {
        Self {
            action: XDP_TX,
            output: Out::Dsr { mac: p.mac },
            stats: ones(stats),
            traffic: Traffic::Counted {
                vip: p.vip_id,
                backend: p.id,
                new_flow,
            },
        }
    }

    /// IP-in-IP out of the ingress interface lbA (XDP_TX).
    fn ipip_tx(p: &Pick, hash_key: &FlowKey, new_flow: bool, stats: &[u32]) -> Self {
        Self {
            action: XDP_TX,
            output: Out::Ipip(IpipOut {
                backend: p.addr,
                dmac: neighbour_mac(p.addr),
                smac: LBA_MAC,
                hash: flow_hash(hash_key, SEED),
            }),
            stats: ones(stats),
            traffic: Traffic::Counted {
                vip: p.vip_id,
                backend: p.id,
                new_flow,
            },
        }
    }

    fn exact(action: u32, out: Vec<u8>, stats: &[u32]) -> Self {
        Self {
            action,
            output: Out::Exact(out),
            ..Self::pass(stats)
        }
    }

    fn traffic(mut self, t: Traffic) -> Self {
        self.traffic = t;
        self
    }
}

// ===========================================================================
// Flows and packets
// ===========================================================================

/// A 5-tuple in the client → VIP direction.
#[derive(Clone, Copy, Debug)]
struct Flow {
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    proto: Protocol,
}

fn push_ip(b: PacketBuilder, src: IpAddr, dst: IpAddr) -> PacketBuilder {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => b.ipv4(s, d),
        (IpAddr::V6(s), IpAddr::V6(d)) => b.ipv6(s, d),
        _ => panic!("fixture bug: mixed address families {src} -> {dst}"),
    }
}

/// Client → load balancer Ethernet header.
fn client_eth() -> PacketBuilder {
    PacketBuilder::eth(CLIENT_MAC, LB_MAC)
}

impl Flow {
    fn tcp(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Self {
        Self {
            src: src.into(),
            sport,
            dst: dst.into(),
            dport,
            proto: Protocol::Tcp,
        }
    }

    fn udp(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Self {
        Self {
            proto: Protocol::Udp,
            ..Self::tcp(src, sport, dst, dport)
        }
    }

    fn port(self, sport: u16) -> Self {
        Self { sport, ..self }
    }

    fn from(self, src: impl Into<IpAddr>) -> Self {
        Self {
            src: src.into(),
            ..self
        }
    }

    fn key(&self) -> FlowKey {
        let p = self.proto.number();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => flow_key_v4(s, self.sport, d, self.dport, p),
            (IpAddr::V6(s), IpAddr::V6(d)) => flow_key_v6(s, self.sport, d, self.dport, p),
            _ => panic!("fixture bug: mixed address families in {self:?}"),
        }
    }

    /// The builder up to the payload: `eth` (with any tags), the IP layer,
    /// `ip` (layer modifiers), the transport.
    fn builder(
        &self,
        eth: PacketBuilder,
        flags: TcpFlags,
        ip: impl FnOnce(PacketBuilder) -> PacketBuilder,
    ) -> PacketBuilder {
        let b = ip(push_ip(eth, self.src, self.dst));
        match self.proto {
            Protocol::Tcp => b.tcp(self.sport, self.dport, flags),
            Protocol::Udp => b.udp(self.sport, self.dport),
        }
        .payload(PAYLOAD)
    }

    fn frame(
        &self,
        eth: PacketBuilder,
        flags: TcpFlags,
        ip: impl FnOnce(PacketBuilder) -> PacketBuilder,
    ) -> Vec<u8> {
        self.builder(eth, flags, ip).build()
    }

    /// A plain client frame (TCP with `flags`; ignored for UDP).
    fn pkt(&self, flags: TcpFlags) -> Vec<u8> {
        self.frame(client_eth(), flags, |b| b)
    }

    /// A UDP datagram (for UDP flows).
    fn dgram(&self) -> Vec<u8> {
        self.pkt(TcpFlags::NONE)
    }

    fn syn(&self) -> Vec<u8> {
        self.pkt(TcpFlags::SYN)
    }

    fn ack(&self) -> Vec<u8> {
        self.pkt(TcpFlags::ACK | TcpFlags::PSH)
    }

    /// The server's reply (VIP → client) as an ICMP error quotes it: the IP
    /// header and 8 bytes (IPv4), the whole packet (IPv6).
    fn reply_quote(&self) -> Vec<u8> {
        let b = push_ip(PacketBuilder::new(), self.dst, self.src);
        let b = match self.proto {
            Protocol::Tcp => b.tcp(self.dport, self.sport, TcpFlags::ACK),
            Protocol::Udp => b.udp(self.dport, self.sport),
        };
        let mut q = b.payload(PAYLOAD).build_ip_only();
        if self.src.is_ipv4() {
            q.truncate(20 + 8);
        }
        q
    }

    /// ICMP "fragmentation needed" (IPv4) / ICMPv6 "packet too big" from a
    /// router to the VIP, about this flow's reply, quoting `quote`.
    fn ptb_with_quote(&self, quote: &[u8]) -> Vec<u8> {
        let eth = PacketBuilder::eth(ROUTER_MAC, LB_MAC);
        match self.dst {
            IpAddr::V4(vip) => eth
                .ipv4(ROUTER_V4, vip)
                .icmp_frag_needed(1400, quote)
                .build(),
            IpAddr::V6(vip) => eth
                .ipv6(ROUTER_V6, vip)
                .icmpv6_packet_too_big(1280, quote)
                .build(),
        }
    }

    fn ptb(&self) -> Vec<u8> {
        self.ptb_with_quote(&self.reply_quote())
    }

    /// Real fragments of one datagram of this flow with a `len`-byte payload.
    fn fragments(&self, len: usize, id: u32) -> Vec<Vec<u8>> {
        let frags = self
            .builder(client_eth(), TcpFlags::ACK, |b| b)
            .payload(&vec![0xab; len])
            .build_fragments(512, id);
        assert!(
            frags.len() >= 2,
            "fixture bug: {self:?} gave {} fragment(s)",
            frags.len()
        );
        frags
    }
}

/// The first port in `ports` for which `pred` holds.
fn find_flow(
    base: Flow,
    ports: std::ops::Range<u16>,
    what: &str,
    pred: impl Fn(&Flow) -> bool,
) -> Flow {
    ports
        .clone()
        .map(|p| base.port(p))
        .find(|f| pred(f))
        .unwrap_or_else(|| panic!("fixture precondition: no port in {ports:?} gives {what}"))
}

/// `frame` with byte `at` set to `value` (a deliberately broken field).
fn patched(mut frame: Vec<u8>, at: usize, value: u8) -> Vec<u8> {
    frame[at] = value;
    frame
}

fn truncated(mut frame: Vec<u8>, len: usize) -> Vec<u8> {
    assert!(
        len < frame.len(),
        "fixture bug: truncating {} bytes to {len}",
        frame.len()
    );
    frame.truncate(len);
    frame
}

// ===========================================================================
// Specs and independent backend selection
// ===========================================================================

fn backend(address: impl Into<IpAddr>, mac: Option<Mac>) -> BackendSpec {
    BackendSpec {
        address: address.into(),
        weight: 100,
        mac: mac.map(MacAddr),
        state: BackendState::Active,
    }
}

fn vip_spec(
    address: impl Into<IpAddr>,
    port: u16,
    protocol: Protocol,
    mode: ForwardingMode,
    backends: Vec<BackendSpec>,
) -> VipSpec {
    VipSpec {
        backends,
        ..scenario::vip(address.into(), port, protocol, mode, 0)
    }
}

fn make_plan(spec: &DataplaneSpec, previous: &IdAllocator) -> MapPlan {
    plan::plan(spec, previous).unwrap_or_else(|e| panic!("planning a fixture spec failed: {e}"))
}

fn planned_vip(plan: &MapPlan, addr: IpAddr, port: u16, proto: Protocol) -> &PlannedVip {
    plan.vips
        .iter()
        .find(|v| v.vip.address == addr && v.vip.port == port && v.vip.protocol == proto)
        .unwrap_or_else(|| panic!("fixture bug: no VIP {addr}:{port}/{proto} in the plan"))
}

fn pick_id(plan: &MapPlan, vip_id: u32, id: u32) -> Pick {
    let b = plan
        .backends
        .iter()
        .find(|b| b.id == id)
        .unwrap_or_else(|| panic!("fixture bug: ring names backend id {id} which the plan lacks"));
    Pick {
        vip_id,
        id,
        addr: b.address,
        mac: b.entry.mac,
    }
}

/// The ring's choice for `key` (honouring source affinity), from the plan.
fn ring_pick(plan: &MapPlan, vip: &PlannedVip, key: &FlowKey) -> Pick {
    let hashed = if vip.meta.flags & VIP_F_SRC_AFFINITY != 0 {
        key.affinity()
    } else {
        *key
    };
    let slot = ring_slot(
        flow_hash(&hashed, plan.global.hash_seed),
        vip.meta.ring_size,
    );
    pick_id(plan, vip.meta.vip_id, vip.ring[slot as usize])
}

/// The ring's choice for a flow's VIP.
fn pick(plan: &MapPlan, flow: &Flow) -> Pick {
    ring_pick(
        plan,
        planned_vip(plan, flow.dst, flow.dport, flow.proto),
        &flow.key(),
    )
}

/// Where fragments of `flow` go: the ring of the lowest-port VIP on the
/// flow's address and protocol, hashed without ports.
fn frag_pick(plan: &MapPlan, flow: &Flow) -> Pick {
    let vip = plan
        .vips
        .iter()
        .filter(|v| v.vip.address == flow.dst && v.vip.protocol == flow.proto)
        .min_by_key(|v| v.vip.port)
        .unwrap_or_else(|| panic!("fixture bug: no VIP on {} for fragments", flow.dst));
    ring_pick(plan, vip, &flow.key().without_ports())
}

/// Whether the VIP address prefilter has `addr`'s bit set: computed from the
/// plan's VIP addresses with `vip_filter_bit`, not read from the plan's
/// bitmap.
fn in_vip_filter(plan: &MapPlan, addr: IpAddr) -> bool {
    let bit = vip_filter_bit(&packet::ip_words(addr));
    plan.vips
        .iter()
        .any(|v| vip_filter_bit(&packet::ip_words(v.vip.address)) == bit)
}

/// An IPv4 address that is no VIP but shares a VIP address's prefilter bit.
fn prefilter_twin(plan: &MapPlan) -> Ipv4Addr {
    (5..=255u8)
        .flat_map(|x| (1..=254u8).map(move |y| Ipv4Addr::new(198, 18, x, y)))
        .find(|a| plan.vips.iter().all(|v| v.vip.address != IpAddr::V4(*a)) && in_vip_filter(plan, (*a).into()))
        .expect("fixture precondition: some address in 198.18.5.0-198.18.255.255 shares a VIP's prefilter bit")
}

/// Main spec of the DSR groups: the standard set with 4 backends, a
/// source-affinity VIP, an empty VIP and a VIP whose backends weigh 0.
fn main_spec() -> DataplaneSpec {
    let mut s = scenario::standard(4);
    let mut affinity = scenario::vip(
        AFFINITY_VIP.into(),
        80,
        Protocol::Tcp,
        ForwardingMode::Dsr,
        4,
    );
    affinity.hash = HashMode::SourceAddress;
    s.vips.push(affinity);
    s.vips.push(scenario::vip(
        EMPTY_VIP.into(),
        80,
        Protocol::Tcp,
        ForwardingMode::Dsr,
        0,
    ));
    let mut zero = scenario::vip(
        ZERO_WEIGHT_VIP.into(),
        80,
        Protocol::Tcp,
        ForwardingMode::Dsr,
        3,
    );
    for b in &mut zero.backends {
        b.weight = 0;
    }
    s.vips.push(zero);
    s
}

// ===========================================================================
// Output checks
// ===========================================================================

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn bytes_diff(what: &str, want: &[u8], got: &[u8]) -> Option<String> {
    if want == got {
        return None;
    }
    let first = want
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(want.len().min(got.len()));
    let lo = first.saturating_sub(4);
    let show = |b: &[u8]| hex(&b[lo.min(b.len())..(first + 12).min(b.len())]);
    Some(format!(
        "{what}: got {} bytes, want {}; first difference at byte {first}: got [{}] want [{}] (from byte {lo})",
        got.len(),
        want.len(),
        show(got),
        show(want)
    ))
}

fn dsr_expected(input: &[u8], mac: Mac) -> Vec<u8> {
    let mut e = input.to_vec();
    e[0..6].copy_from_slice(&mac);
    e[6..12].copy_from_slice(&input[0..6]);
    e
}

/// Outer source for IP-in-IP: the configured prefix whose host part holds
/// the flow hash's bytes at the same positions (v4 /24: the last byte; v6
/// /96: the last word), see `GlobalConfig`.
fn outer_src(v6: bool, hash: u32) -> IpAddr {
    let h = hash.to_ne_bytes();
    if v6 {
        let mut o = IPIP_SRC_V6.octets();
        o[12..16].copy_from_slice(&h);
        IpAddr::V6(o.into())
    } else {
        let mut o = IPIP_SRC_V4.octets();
        o[3] = h[3];
        IpAddr::V4(o.into())
    }
}

/// The whole IP-in-IP frame the program must emit for `input`, built here
/// independently of the program.
fn ipip_expected(input: &[u8], l2: usize, e: &IpipOut) -> Vec<u8> {
    let inner = &input[l2..];
    let mut f = Vec::with_capacity(input.len() + 40);
    f.extend_from_slice(&e.dmac);
    f.extend_from_slice(&e.smac);
    f.extend_from_slice(&input[12..l2]); // tags and EtherType, unchanged
    match (e.backend, outer_src(e.backend.is_ipv6(), e.hash)) {
        (IpAddr::V4(dst), IpAddr::V4(src)) => {
            let total = u16::from_be_bytes([inner[2], inner[3]]) + 20;
            let mut h = vec![0x45, inner[1]];
            h.extend_from_slice(&total.to_be_bytes());
            h.extend_from_slice(&[0, 0, 0x40, 0, 64, packet::PROTO_IPIP, 0, 0]);
            h.extend_from_slice(&src.octets());
            h.extend_from_slice(&dst.octets());
            let csum = packet::internet_checksum(&h);
            h[10..12].copy_from_slice(&csum.to_be_bytes());
            f.extend_from_slice(&h);
        }
        (IpAddr::V6(dst), IpAddr::V6(src)) => {
            let tclass = u32::from(((inner[0] & 0x0f) << 4) | (inner[1] >> 4));
            let vtc = (6 << 28) | (tclass << 20) | (e.hash & 0x000f_ffff);
            let plen = u16::from_be_bytes([inner[4], inner[5]]) + 40;
            f.extend_from_slice(&vtc.to_be_bytes());
            f.extend_from_slice(&plen.to_be_bytes());
            f.extend_from_slice(&[packet::PROTO_IPV6, 64]);
            f.extend_from_slice(&src.octets());
            f.extend_from_slice(&dst.octets());
        }
        _ => unreachable!(),
    }
    f.extend_from_slice(inner);
    f
}

fn in_prefix(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => a.octets()[..3] == IPIP_SRC_V4.octets()[..3],
        IpAddr::V6(a) => a.octets()[..12] == IPIP_SRC_V6.octets()[..12],
    }
}

/// Decoded-field checks of an IP-in-IP output (readable failures), then the
/// exact bytes.
fn check_ipip(input: &[u8], out: &[u8], e: &IpipOut, errs: &mut Vec<String>) {
    let din = decode(input).expect("fixture bug: input does not decode");
    let l2 = din.l3_offset;
    let inner_ip = &input[l2..];
    let d = match decode(out) {
        Ok(d) => d,
        Err(err) => {
            errs.push(format!("output does not decode: {err}; bytes {}", hex(out)));
            return;
        }
    };
    if d.eth_dst != e.dmac || d.eth_src != e.smac {
        errs.push(format!(
            "MACs: got dst {} src {}, want dst {} (neighbour) src {} (egress interface)",
            hex(&d.eth_dst),
            hex(&d.eth_src),
            hex(&e.dmac),
            hex(&e.smac)
        ));
    }
    if d.vlan_tags != din.vlan_tags {
        errs.push(format!(
            "VLAN tags: got {:?}, want {:?}",
            d.vlan_tags, din.vlan_tags
        ));
    }
    if let [outer, inner] = &d.ip[..] {
        let inner_total = din.ip[0].total_len;
        if outer.dst != e.backend {
            errs.push(format!(
                "outer dst {}, want backend {}",
                outer.dst, e.backend
            ));
        }
        if !in_prefix(outer.src) {
            errs.push(format!(
                "outer src {} is outside the configured prefix",
                outer.src
            ));
        }
        if outer.src != outer_src(e.backend.is_ipv6(), e.hash) {
            errs.push(format!(
                "outer src {}, want {} (prefix + flow hash {:#010x})",
                outer.src,
                outer_src(e.backend.is_ipv6(), e.hash),
                e.hash
            ));
        }
        if !outer.checksum_ok {
            errs.push("outer IPv4 header checksum is wrong".into());
        }
        if outer.version == 4 && outer.total_len != inner_total + 20 {
            errs.push(format!(
                "outer total length {}, want inner {inner_total} + 20",
                outer.total_len
            ));
        }
        if outer.version == 6 && outer.payload_len != inner_total {
            errs.push(format!(
                "outer payload length {}, want inner total {inner_total}",
                outer.payload_len
            ));
        }
        if outer.tos != inner.tos {
            errs.push(format!(
                "outer TOS/traffic class {:#x}, inner {:#x}",
                outer.tos, inner.tos
            ));
        }
        if inner.bytes != inner_ip {
            errs.push("inner packet changed".into());
        }
    } else {
        errs.push(format!(
            "{} IP layers in the output, want 2 (outer + inner)",
            d.ip.len()
        ));
    }
    if let Some(diff) = bytes_diff("IP-in-IP frame", &ipip_expected(input, l2, e), out) {
        errs.push(diff);
    }
}

fn check_output(input: &[u8], out: &[u8], want: &Out, errs: &mut Vec<String>) {
    let diff = match want {
        Out::Unchanged => bytes_diff("output (want = input)", input, out),
        Out::Dsr { mac } => bytes_diff(
            "DSR output (want = input with MACs rewritten)",
            &dsr_expected(input, *mac),
            out,
        ),
        Out::Exact(e) => bytes_diff("output", e, out),
        Out::Ipip(e) => {
            check_ipip(input, out, e, errs);
            None
        }
    };
    errs.extend(diff);
}

// ===========================================================================
// Counters
// ===========================================================================

#[derive(Clone, Default)]
struct Snapshot {
    global: Vec<u64>,
    vips: BTreeMap<u32, TrafficCounters>,
    backends: BTreeMap<u32, TrafficCounters>,
}

fn traffic_delta(
    what: &str,
    before: &BTreeMap<u32, TrafficCounters>,
    after: &BTreeMap<u32, TrafficCounters>,
    want_id: Option<u32>,
    want: TrafficCounters,
    errs: &mut Vec<String>,
) {
    if let Some(id) = want_id.filter(|id| !after.contains_key(id)) {
        errs.push(format!("{what} {id} is not reported by stats()"));
    }
    let ids: BTreeSet<u32> = before.keys().chain(after.keys()).copied().collect();
    for id in ids {
        let (b, a) = (
            before.get(&id).copied().unwrap_or_default(),
            after.get(&id).copied().unwrap_or_default(),
        );
        let got = TrafficCounters {
            packets: a.packets.wrapping_sub(b.packets),
            bytes: a.bytes.wrapping_sub(b.bytes),
            new_flows: a.new_flows.wrapping_sub(b.new_flows),
        };
        let exp = if Some(id) == want_id {
            want
        } else {
            TrafficCounters::default()
        };
        if got != exp {
            errs.push(format!(
                "{what} {id}: +{} packets +{} bytes +{} new flows, want +{} +{} +{}",
                got.packets, got.bytes, got.new_flows, exp.packets, exp.bytes, exp.new_flows
            ));
        }
    }
}

fn check_counters(
    names: &[&str],
    before: &Snapshot,
    after: &Snapshot,
    exp: &Expect,
    packet_len: usize,
    errs: &mut Vec<String>,
) {
    for (i, name) in names.iter().enumerate() {
        let i32 = i as u32;
        let got = after.global[i].wrapping_sub(before.global[i]);
        let want: u64 = exp
            .stats
            .iter()
            .filter(|(s, _)| *s == i32)
            .map(|(_, d)| d)
            .sum();
        if got != want {
            errs.push(format!("counter {name}: +{got}, want +{want}"));
        }
    }
    match exp.traffic {
        Traffic::Unchecked => {}
        Traffic::Nothing => {
            traffic_delta(
                "VIP",
                &before.vips,
                &after.vips,
                None,
                TrafficCounters::default(),
                errs,
            );
            traffic_delta(
                "backend",
                &before.backends,
                &after.backends,
                None,
                TrafficCounters::default(),
                errs,
            );
        }
        Traffic::Counted {
            vip,
            backend,
            new_flow,
        } => {
            let one = TrafficCounters {
                packets: 1,
                bytes: packet_len as u64,
                new_flows: u64::from(new_flow),
            };
            traffic_delta("VIP", &before.vips, &after.vips, Some(vip), one, errs);
            traffic_delta(
                "backend",
                &before.backends,
                &after.backends,
                Some(backend),
                one,
                errs,
            );
        }
    }
}

// ===========================================================================
// Targets and the runner
// ===========================================================================

/// `struct xdp_md` for `ctx_in`: data and data_meta 0 (no metadata),
/// data_end = the length of the linear part the program sees (normally the
/// whole packet; the kernel puts the rest in a fragment), the ingress
/// ifindex (0: the loopback device's queue), rx queue 0, egress 0 (the
/// kernel rejects anything else there).
fn xdp_md(linear: usize, ingress_ifindex: u32) -> Vec<u8> {
    [0u32, linear as u32, 0, ingress_ifindex, 0, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect()
}

fn test_run(
    prog: &Xdp,
    packet: &[u8],
    linear: Option<usize>,
    ingress: Option<u32>,
) -> Result<(u32, Vec<u8>), String> {
    let ctx = (linear.is_some() || ingress.is_some())
        .then(|| xdp_md(linear.unwrap_or(packet.len()), ingress.unwrap_or(0)));
    let mut out = vec![0u8; packet.len() + 512];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = Some(&mut out);
    opts.ctx_in = ctx.as_deref();
    opts.repeat = 1;
    let r = prog
        .test_run(opts)
        .map_err(|e| format!("BPF_PROG_TEST_RUN failed: {e}"))?;
    let len = r.data_size_out as usize;
    out.truncate(len);
    Ok((r.return_value, out))
}

trait Target {
    fn counter_names(&self) -> &'static [&'static str];
    fn outcome_counters(&self) -> Vec<u32>;
    fn snapshot(&self) -> Snapshot;
    fn run(&mut self, packet: &[u8], linear: Option<usize>) -> Result<(u32, Vec<u8>), String>;
    fn before(&mut self, b: &Before);
}

/// `xdp_lb` with a plan applied; `ingress` is the ctx's ingress ifindex.
struct Lb {
    dp: Datapath,
    ingress: Option<u32>,
}

impl Lb {
    fn load(plan: &MapPlan, ingress: Option<u32>) -> Self {
        let mut dp = Datapath::load(LoadOptions::default())
            .unwrap_or_else(|e| panic!("loading xdp_lb failed: {e}"));
        dp.apply(plan)
            .unwrap_or_else(|e| panic!("applying the initial plan failed: {e}"));
        // Client frames are addressed to LB_MAC: the interface's own MAC.
        dp.set_interface_mac(LB_MAC)
            .unwrap_or_else(|e| panic!("setting the program's MAC failed: {e}"));
        Self { dp, ingress }
    }
}

impl Target for Lb {
    fn counter_names(&self) -> &'static [&'static str] {
        &STAT_NAMES
    }

    fn outcome_counters(&self) -> Vec<u32> {
        STAT_OUTCOMES.to_vec()
    }

    fn snapshot(&self) -> Snapshot {
        let s = self
            .dp
            .stats()
            .unwrap_or_else(|e| panic!("reading counters failed: {e}"));
        Snapshot {
            global: s.global,
            vips: s.vips,
            backends: s.backends,
        }
    }

    fn run(&mut self, packet: &[u8], linear: Option<usize>) -> Result<(u32, Vec<u8>), String> {
        let ingress = self.ingress;
        let prog = self.dp.program().map_err(|e| format!("no program: {e}"))?;
        test_run(prog, packet, linear, ingress)
    }

    fn before(&mut self, b: &Before) {
        match b {
            Before::Apply(plan) => {
                self.dp
                    .apply(plan)
                    .unwrap_or_else(|e| panic!("applying a plan failed: {e}"));
            }
            Before::AllowEgress(ifname) => {
                let idx = ifindex(ifname);
                self.dp
                    .set_egress_interfaces(&[idx])
                    .unwrap_or_else(|e| panic!("set_egress_interfaces({ifname}) failed: {e}"));
            }
        }
    }
}

struct DecapTarget(Decap);

impl Target for DecapTarget {
    fn counter_names(&self) -> &'static [&'static str] {
        &DECAP_STAT_NAMES
    }

    fn outcome_counters(&self) -> Vec<u32> {
        // Every decap counter is an outcome: one per packet.
        (0..DECAP_STAT_NAMES.len() as u32).collect()
    }

    fn snapshot(&self) -> Snapshot {
        let global = self
            .0
            .stats()
            .unwrap_or_else(|e| panic!("reading decap counters failed: {e}"));
        Snapshot {
            global,
            ..Snapshot::default()
        }
    }

    fn run(&mut self, packet: &[u8], linear: Option<usize>) -> Result<(u32, Vec<u8>), String> {
        let prog = self.0.program().map_err(|e| format!("no program: {e}"))?;
        test_run(prog, packet, linear, None)
    }

    fn before(&mut self, _: &Before) {
        panic!("fixture bug: decap fixtures take no `before` step");
    }
}

/// Runs a group's fixtures in order; panics at the end listing every failed
/// fixture with its reasons.
fn run_group(group: &str, target: &mut dyn Target, fixtures: &[Fixture]) {
    let start = Instant::now();
    let names = target.counter_names();
    let outcomes = target.outcome_counters();
    let mut seen = BTreeSet::new();
    for fx in fixtures {
        assert!(
            seen.insert(fx.name.as_str()),
            "fixture bug: duplicate name {:?} in {group}",
            fx.name
        );
        let listed: Vec<_> = fx
            .expect
            .stats
            .iter()
            .filter(|(s, _)| outcomes.contains(s))
            .collect();
        assert!(
            listed.len() == 1 && listed[0].1 == 1,
            "fixture bug: {:?} must list exactly one outcome counter with delta 1, lists {listed:?}",
            fx.name
        );
    }
    let mut failures = Vec::new();
    for fx in fixtures {
        for b in &fx.before {
            target.before(b);
        }
        let before = target.snapshot();
        let res = target.run(&fx.packet, fx.linear);
        let after = target.snapshot();
        let mut errs = Vec::new();
        match res {
            Err(e) => errs.push(e),
            Ok((action, out)) => {
                if action != fx.expect.action {
                    errs.push(format!(
                        "action {} ({action}), want {}",
                        action_name(action),
                        action_name(fx.expect.action)
                    ));
                }
                check_output(&fx.packet, &out, &fx.expect.output, &mut errs);
            }
        }
        check_counters(
            names,
            &before,
            &after,
            &fx.expect,
            fx.packet.len(),
            &mut errs,
        );
        println!(
            "[{group}] {} {}",
            if errs.is_empty() { "ok  " } else { "FAIL" },
            fx.name
        );
        for e in &errs {
            println!("[{group}]        {e}");
        }
        if !errs.is_empty() {
            failures.push(format!("{}:\n      {}", fx.name, errs.join("\n      ")));
        }
    }
    println!(
        "[{group}] {} fixtures, {} failed, {:.0?}",
        fixtures.len(),
        failures.len(),
        start.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{group}: {} of {} fixtures failed:\n  {}",
        failures.len(),
        fixtures.len(),
        failures.join("\n  ")
    );
}

// ===========================================================================
// Network namespace for IP-in-IP
// ===========================================================================

fn ifindex(name: &str) -> u32 {
    let c = CString::new(name).expect("interface name");
    // SAFETY: c is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert!(
        idx != 0,
        "interface {name} not found in this thread's namespace: {}",
        std::io::Error::last_os_error()
    );
    idx
}

fn run_cmd(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn mac_str(m: Mac) -> String {
    MacAddr(m).to_string()
}

/// A network namespace `lbfx-<pid>-<n>`, deleted on drop (also on panic).
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        Self::remove_stale();
        let name = format!(
            "lbfx-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run_cmd(&["ip", "netns", "add", &name]).unwrap_or_else(|e| panic!("{e}"));
        Self { name }
    }

    /// Namespaces of earlier runs of this suite whose process is gone (killed
    /// before its guards ran).
    fn remove_stale() {
        let Ok(dir) = std::fs::read_dir("/run/netns") else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix("lbfx-").and_then(|r| r.split('-').next()) else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = run_cmd(&["ip", "netns", "del", &name]);
            }
        }
    }

    /// `ip -n <ns> <args>`.
    fn ip(&self, args: &str) {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend(args.split_whitespace());
        run_cmd(&all).unwrap_or_else(|e| panic!("netns setup: {e}"));
    }

    /// Two veth pairs: lbA (198.18.2.254/24, 2001:db8:2::fe/64) whose peer
    /// is lbB, and lbC (198.18.3.254/24, 2001:db8:3::fe/64) whose peer is
    /// lbD; forwarding on; permanent neighbours for the backends.
    fn setup(&self) {
        self.ip("link set lo up");
        self.ip(&format!(
            "link add {LBA} address {} type veth peer name lbB address {}",
            mac_str(LBA_MAC),
            mac_str(LBB_MAC)
        ));
        self.ip(&format!(
            "link add {LBC} address {} type veth peer name lbD address {}",
            mac_str(LBC_MAC),
            mac_str(LBD_MAC)
        ));
        for dev in [LBA, "lbB", LBC, "lbD"] {
            self.ip(&format!("link set {dev} up"));
        }
        self.ip(&format!("addr add 198.18.2.254/24 dev {LBA}"));
        self.ip(&format!("addr add 2001:db8:2::fe/64 dev {LBA} nodad"));
        self.ip(&format!("addr add 198.18.3.254/24 dev {LBC}"));
        self.ip(&format!("addr add 2001:db8:3::fe/64 dev {LBC} nodad"));
        run_cmd(&[
            "ip",
            "netns",
            "exec",
            &self.name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ])
        .unwrap_or_else(|e| panic!("netns setup: {e}"));
        for i in 1..=3 {
            let mac = mac_str(backend_mac(i));
            self.ip(&format!(
                "neigh add {} lladdr {mac} dev {LBA} nud permanent",
                backend_v4(i)
            ));
            self.ip(&format!(
                "-6 neigh add {} lladdr {mac} dev {LBA} nud permanent",
                backend_v6(i)
            ));
        }
        let mac = mac_str(backend_mac(9));
        self.ip(&format!(
            "neigh add {SMALL_MTU_BACKEND_V4} lladdr {mac} dev {LBA} nud permanent"
        ));
        self.ip(&format!(
            "-6 neigh add {SMALL_MTU_BACKEND_V6} lladdr {mac} dev {LBA} nud permanent"
        ));
        self.ip(&format!(
            "route add {SMALL_MTU_BACKEND_V4}/32 dev {LBA} mtu lock {SMALL_ROUTE_MTU}"
        ));
        self.ip(&format!(
            "-6 route add {SMALL_MTU_BACKEND_V6}/128 dev {LBA} mtu lock {SMALL_ROUTE_MTU}"
        ));
        let mac = mac_str(REDIR_BACKEND_MAC);
        self.ip(&format!(
            "neigh add {REDIR_BACKEND_V4} lladdr {mac} dev {LBC} nud permanent"
        ));
        self.ip(&format!(
            "-6 neigh add {REDIR_BACKEND_V6} lladdr {mac} dev {LBC} nud permanent"
        ));
    }

    /// Moves the calling thread (only it) into the namespace.
    fn enter(name: &str) {
        let path = format!("/run/netns/{name}");
        let f = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: a valid namespace fd; setns affects only this thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert!(
            rc == 0,
            "setns({path}) failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_cmd(&["ip", "netns", "del", &self.name]) {
            eprintln!("warning: could not delete namespace {}: {e}", self.name);
        }
    }
}

/// The MAC the namespace's neighbour table holds for a backend address.
fn neighbour_mac(addr: IpAddr) -> Mac {
    for i in 1..=3 {
        if addr == IpAddr::V4(backend_v4(i)) || addr == IpAddr::V6(backend_v6(i)) {
            return backend_mac(i);
        }
    }
    if addr == IpAddr::V4(REDIR_BACKEND_V4) || addr == IpAddr::V6(REDIR_BACKEND_V6) {
        return REDIR_BACKEND_MAC;
    }
    if addr == IpAddr::V4(SMALL_MTU_BACKEND_V4) || addr == IpAddr::V6(SMALL_MTU_BACKEND_V6) {
        return backend_mac(9);
    }
    panic!("fixture bug: no neighbour entry for {addr}")
}

// ===========================================================================
// Group: DSR forwarding and header parsing
// ===========================================================================

fn dsr_fixtures(plan: &MapPlan) -> Vec<Fixture> {
    let tcp4 = Flow::tcp(CLIENT_V4, 40001, VIP_V4, 80);
    let udp4 = Flow::udp(CLIENT_V4, 40002, VIP_V4, 53);
    let tcp6 = Flow::tcp(CLIENT_V6, 40003, VIP_V6, 80);
    let udp6 = Flow::udp(CLIENT_V6, 40004, VIP_V6, 53);
    let mid4 = tcp4.port(40005);
    let vlan4 = tcp4.port(40006);
    let qinq6 = tcp6.port(40007);
    let opts4 = tcp4.port(40008);
    let df4 = tcp4.port(40009);
    let tcpopt4 = tcp4.port(40010);
    let (hbh6, rt6, dst6, chain4_6) = (
        tcp6.port(40011),
        tcp6.port(40012),
        udp6.port(40013),
        tcp6.port(40014),
    );
    let p = |f: &Flow| pick(plan, f);
    let mut fx = vec![
        Fixture::new(
            "v4 TCP SYN -> DSR to the ring's backend (new flow, conn miss)",
            tcp4.syn(),
            Expect::dsr(&p(&tcp4), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v4 TCP ACK of that flow -> same backend (conn hit)",
            tcp4.ack(),
            Expect::dsr(&p(&tcp4), false, &[STAT_TX, STAT_CONN_HIT]),
        ),
        Fixture::new(
            "v4 TCP SYN|ACK of that flow is not a new connection (conn hit)",
            tcp4.pkt(TcpFlags::SYN | TcpFlags::ACK),
            Expect::dsr(&p(&tcp4), false, &[STAT_TX, STAT_CONN_HIT]),
        ),
        Fixture::new(
            "v4 TCP mid-stream ACK without an entry -> ring pick (conn miss)",
            mid4.ack(),
            Expect::dsr(&p(&mid4), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v4 UDP first datagram -> DSR (conn miss)",
            udp4.dgram(),
            Expect::dsr(&p(&udp4), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v4 UDP repeated datagram -> same backend (conn hit)",
            udp4.dgram(),
            Expect::dsr(&p(&udp4), false, &[STAT_TX, STAT_CONN_HIT]),
        ),
        Fixture::new(
            "v6 TCP SYN -> DSR (conn miss)",
            tcp6.syn(),
            Expect::dsr(&p(&tcp6), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v6 TCP ACK of that flow -> same backend (conn hit)",
            tcp6.ack(),
            Expect::dsr(&p(&tcp6), false, &[STAT_TX, STAT_CONN_HIT]),
        ),
        Fixture::new(
            "v6 UDP first datagram -> DSR (conn miss)",
            udp6.dgram(),
            Expect::dsr(&p(&udp6), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v6 UDP repeated datagram -> same backend (conn hit)",
            udp6.dgram(),
            Expect::dsr(&p(&udp6), false, &[STAT_TX, STAT_CONN_HIT]),
        ),
        Fixture::new(
            "802.1Q-tagged (vid 100) v4 SYN -> DSR, tag preserved",
            vlan4.frame(client_eth().vlan(100), TcpFlags::SYN, |b| b),
            Expect::dsr(&p(&vlan4), true, &[STAT_TX, STAT_CONN_MISS, STAT_VLAN]),
        ),
        Fixture::new(
            "802.1ad-tagged (vid 200) v6 SYN -> DSR, tag preserved",
            qinq6.frame(client_eth().vlan_8021ad(200), TcpFlags::SYN, |b| b),
            Expect::dsr(&p(&qinq6), true, &[STAT_TX, STAT_CONN_MISS, STAT_VLAN]),
        ),
        Fixture::new(
            "802.1Q-tagged v4 ACK of the tagged flow -> same backend (conn hit)",
            vlan4.frame(client_eth().vlan(100), TcpFlags::ACK, |b| b),
            Expect::dsr(&p(&vlan4), false, &[STAT_TX, STAT_CONN_HIT, STAT_VLAN]),
        ),
        // Untagged IPv4 TCP without options is read at constant offsets,
        // every other layout by the general parse: both must build the
        // same flow key, or a flow whose packets change layout would lose
        // its entry.
        Fixture::new(
            "untagged ACK of the tagged flow (constant-offset read) -> same entry (conn hit)",
            vlan4.ack(),
            Expect::dsr(&p(&vlan4), false, &[STAT_TX, STAT_CONN_HIT]),
        ),
        Fixture::new(
            "ACK with IP options (general parse) of the untagged v4 flow -> same entry (conn hit)",
            tcp4.frame(client_eth(), TcpFlags::ACK, |b| {
                b.ipv4_options(&[1, 1, 1, 1])
            }),
            Expect::dsr(&p(&tcp4), false, &[STAT_TX, STAT_CONN_HIT]),
        ),
        Fixture::new(
            "v4 with 12 bytes of options (IHL 8) -> ports read after the options, DSR",
            opts4.frame(client_eth(), TcpFlags::SYN, |b| {
                b.ipv4_options(&[1, 1, 1, 1, 7, 7, 4, 0, 0, 0, 0])
            }),
            Expect::dsr(&p(&opts4), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v4 with DF set is not a fragment -> normal flow",
            df4.frame(client_eth(), TcpFlags::SYN, PacketBuilder::dont_fragment),
            Expect::dsr(&p(&df4), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v4 TCP with options (doff 8) -> DSR",
            tcpopt4
                .builder(client_eth(), TcpFlags::SYN, |b| b)
                .tcp_options(&[2, 4, 5, 0xb4, 4, 2, 1, 3, 3, 7])
                .build(),
            Expect::dsr(&p(&tcpopt4), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v6 with hop-by-hop options -> DSR",
            hbh6.frame(client_eth(), TcpFlags::SYN, |b| {
                b.ipv6_ext(ExtHeader::HopByHop { len8: 0 })
            }),
            Expect::dsr(&p(&hbh6), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v6 with a 24-byte routing header -> DSR",
            rt6.frame(client_eth(), TcpFlags::SYN, |b| {
                b.ipv6_ext(ExtHeader::Routing {
                    len8: 2,
                    routing_type: 4,
                    segments_left: 0,
                })
            }),
            Expect::dsr(&p(&rt6), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v6 UDP with 16-byte destination options -> DSR",
            dst6.frame(client_eth(), TcpFlags::NONE, |b| {
                b.ipv6_ext(ExtHeader::DestOpts { len8: 1 })
            }),
            Expect::dsr(&p(&dst6), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v6 with 4 extension headers (the parser's limit) -> DSR",
            chain4_6.frame(client_eth(), TcpFlags::SYN, |b| {
                b.ipv6_ext(ExtHeader::HopByHop { len8: 0 })
                    .ipv6_ext(ExtHeader::DestOpts { len8: 0 })
                    .ipv6_ext(ExtHeader::Routing {
                        len8: 0,
                        routing_type: 0,
                        segments_left: 0,
                    })
                    .ipv6_ext(ExtHeader::DestOpts { len8: 1 })
            }),
            Expect::dsr(&p(&chain4_6), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
    ];

    // Source-address affinity: every flow of a client hashes alike.
    let aff_vip = planned_vip(plan, AFFINITY_VIP.into(), 80, Protocol::Tcp);
    let five_tuple = |f: &Flow| {
        let slot = ring_slot(flow_hash(&f.key(), SEED), aff_vip.meta.ring_size);
        aff_vip.ring[slot as usize]
    };
    let aff1 = Flow::tcp(CLIENT_V4, 41000, AFFINITY_VIP, 80);
    let client = p(&aff1);
    // A second port whose 5-tuple hash would pick another backend: only
    // affinity keeps it on the client's backend.
    let aff2 = find_flow(
        aff1,
        41001..42000,
        "a 5-tuple pick different from the affinity pick",
        |f| five_tuple(f) != client.id,
    );
    let other_client = (2..=250)
        .map(|i| aff1.from(Ipv4Addr::new(198, 18, 1, i)))
        .find(|f| p(f).id != client.id)
        .expect("fixture precondition: some client with another affinity backend");
    fx.extend([
        Fixture::new(
            "affinity VIP: client's first flow -> its address's backend",
            aff1.syn(),
            Expect::dsr(&client, true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "affinity VIP: same client, other port -> same backend",
            aff2.syn(),
            Expect::dsr(&client, true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "affinity VIP: another client -> its own backend",
            other_client.syn(),
            Expect::dsr(&p(&other_client), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
    ]);

    // Issue 25, item 5: only frames addressed to this interface's MAC are
    // forwarded; the source MAC of a DSR frame is then that MAC (Out::Dsr
    // checks src = the input's destination = LB_MAC everywhere above).
    let mac_flow = Flow::tcp(CLIENT_V4, 41500, VIP_V4, 80);
    let to = |dst: Mac, f: &Flow, flags: TcpFlags| {
        f.frame(PacketBuilder::eth(CLIENT_MAC, dst), flags, |b| b)
    };
    fx.extend([
        Fixture::new(
            "SYN to a VIP in a frame unicast to another host's MAC -> pass, no entry",
            to(backend_mac(9), &mac_flow, TcpFlags::SYN),
            Expect::pass(&[STAT_PASS_OTHER_HOST]),
        ),
        Fixture::new(
            "the same flow's ACK addressed to us afterwards -> new flow (the flooded SYN left no entry)",
            mac_flow.ack(),
            Expect::dsr(&p(&mac_flow), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "ACK of that established flow flooded to us for another host -> pass, not forwarded",
            to(backend_mac(9), &mac_flow, TcpFlags::ACK),
            Expect::pass(&[STAT_PASS_OTHER_HOST]),
        ),
        Fixture::new(
            "VIP traffic to the broadcast MAC -> pass (never sent with source ff:ff:ff:ff:ff:ff)",
            to([0xff; 6], &mac_flow.port(41501), TcpFlags::SYN),
            Expect::pass(&[STAT_PASS_OTHER_HOST]),
        ),
        Fixture::new(
            "v6 VIP traffic to a multicast MAC -> pass",
            to(
                [0x33, 0x33, 0, 0, 0, 0x10],
                &Flow::udp(CLIENT_V6, 41502, VIP_V6, 53),
                TcpFlags::NONE,
            ),
            Expect::pass(&[STAT_PASS_OTHER_HOST]),
        ),
        Fixture::new(
            "IPv4 fragment of VIP traffic for another host -> pass",
            {
                let mut f = Flow::udp(CLIENT_V4, 41503, VIP_V4, 53).fragments(1000, 0x4141)[1].clone();
                f[..6].copy_from_slice(&backend_mac(9));
                f
            },
            Expect::pass(&[STAT_PASS_OTHER_HOST]),
        ),
        Fixture::new(
            "non-VIP traffic to another host -> pass not VIP (the MAC is checked for VIP traffic only)",
            Flow::tcp(CLIENT_V4, 41504, NOT_VIP_V4, 80).frame(
                PacketBuilder::eth(CLIENT_MAC, backend_mac(9)),
                TcpFlags::SYN,
                |b| b,
            ),
            if in_vip_filter(plan, NOT_VIP_V4.into()) {
                Expect::pass(&[STAT_PASS_OTHER_HOST])
            } else {
                Expect::pass(&[STAT_PASS_NOT_VIP])
            },
        ),
    ]);
    fx
}

#[test]
fn dsr_forwarding() {
    let plan = make_plan(&main_spec(), &IdAllocator::default());
    let fixtures = dsr_fixtures(&plan);
    run_group("dsr", &mut Lb::load(&plan, None), &fixtures);
}

// ===========================================================================
// Group: ICMP errors and fragments
// ===========================================================================

fn icmp_frag_fixtures(plan: &MapPlan) -> Vec<Fixture> {
    let tcp4 = Flow::tcp(CLIENT_V4, 43001, VIP_V4, 80);
    let fresh4 = tcp4.port(43002);
    let udp4 = Flow::udp(CLIENT_V4, 43003, VIP_V4, 53);
    let tcp6 = Flow::tcp(CLIENT_V6, 43004, VIP_V6, 80);
    let udp6 = Flow::udp(CLIENT_V6, 43005, VIP_V6, 53);
    let p = |f: &Flow| pick(plan, f);

    let quote_with_options = {
        let reply = PacketBuilder::new()
            .ipv4(VIP_V4, CLIENT_V4)
            .ipv4_options(&[1, 1, 1, 1]);
        let mut q = reply
            .tcp(80, tcp4.sport, TcpFlags::ACK)
            .payload(PAYLOAD)
            .build_ip_only();
        q.truncate(24 + 8);
        q
    };
    let mut bad_ihl_quote = tcp4.reply_quote();
    bad_ihl_quote[0] = 0x44;
    let non_vip_quote = Flow::tcp(CLIENT_V4, 43006, NOT_VIP_V4, 80).reply_quote();
    let to_non_vip = PacketBuilder::eth(ROUTER_MAC, LB_MAC)
        .ipv4(ROUTER_V4, NOT_VIP_V4)
        .icmp_frag_needed(1400, &tcp4.reply_quote())
        .build();
    let port_unreach = PacketBuilder::eth(ROUTER_MAC, LB_MAC)
        .ipv4(ROUTER_V4, VIP_V4)
        .icmp(3, 3, [0; 4])
        .payload(&tcp4.reply_quote())
        .build();

    let mut fx = vec![
        Fixture::new(
            "setup: v4 TCP SYN of the flow the ICMP errors are about",
            tcp4.syn(),
            Expect::dsr(&p(&tcp4), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "ICMP frag-needed about an established v4 flow -> that flow's backend (conn hit)",
            tcp4.ptb(),
            Expect::dsr(&p(&tcp4), false, &[STAT_TX, STAT_ICMP_PTB]),
        ),
        Fixture::new(
            "ICMP frag-needed quoting a header with options (IHL 6) -> ports read after the options",
            tcp4.ptb_with_quote(&quote_with_options),
            Expect::dsr(&p(&tcp4), false, &[STAT_TX, STAT_ICMP_PTB]),
        ),
        Fixture::new(
            "ICMP frag-needed about a v4 flow without an entry -> ring pick, no conn miss",
            fresh4.ptb(),
            Expect::dsr(&p(&fresh4), false, &[STAT_TX, STAT_ICMP_PTB]),
        ),
        Fixture::new(
            "the same ICMP again -> still no entry (ICMP never creates one)",
            fresh4.ptb(),
            Expect::dsr(&p(&fresh4), false, &[STAT_TX, STAT_ICMP_PTB]),
        ),
        Fixture::new(
            "ICMP frag-needed about a v4 UDP VIP flow -> ring pick",
            udp4.ptb(),
            Expect::dsr(&p(&udp4), false, &[STAT_TX, STAT_ICMP_PTB]),
        ),
        Fixture::new(
            "setup: v6 TCP SYN of the flow the ICMPv6 error is about",
            tcp6.syn(),
            Expect::dsr(&p(&tcp6), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "ICMPv6 packet-too-big about an established v6 flow -> that flow's backend (conn hit)",
            tcp6.ptb(),
            Expect::dsr(&p(&tcp6), false, &[STAT_TX, STAT_ICMP_PTB]),
        ),
        Fixture::new(
            "ICMPv6 packet-too-big about a v6 UDP VIP flow -> ring pick",
            udp6.ptb(),
            Expect::dsr(&p(&udp6), false, &[STAT_TX, STAT_ICMP_PTB]),
        ),
        Fixture::new(
            "ICMP frag-needed about a non-VIP flow -> pass",
            tcp4.ptb_with_quote(&non_vip_quote),
            Expect::pass(&[STAT_PASS_NOT_VIP]),
        ),
        Fixture::new(
            "ICMP frag-needed quoting only an IP header (no ports) -> pass malformed",
            tcp4.ptb_with_quote(&tcp4.reply_quote()[..20]),
            Expect::pass(&[STAT_PASS_MALFORMED, STAT_ERR_ICMP_INNER]),
        ),
        Fixture::new(
            "ICMP frag-needed quoting a header with IHL 4 -> pass malformed",
            tcp4.ptb_with_quote(&bad_ihl_quote),
            Expect::pass(&[STAT_PASS_MALFORMED, STAT_ERR_ICMP_INNER]),
        ),
        Fixture::new(
            "ICMPv6 packet-too-big quoting only an IPv6 header -> pass malformed",
            tcp6.ptb_with_quote(&tcp6.reply_quote()[..40]),
            Expect::pass(&[STAT_PASS_MALFORMED, STAT_ERR_ICMP_INNER]),
        ),
        Fixture::new(
            "ICMP port-unreachable (3/3) about a VIP flow -> pass",
            port_unreach,
            Expect::pass(&[STAT_PASS_NOT_VIP]),
        ),
        Fixture::new(
            "ICMP frag-needed about a VIP flow sent to a non-VIP address -> pass",
            to_non_vip,
            Expect::pass(&[STAT_PASS_NOT_VIP]),
        ),
        Fixture::new(
            "ICMP echo request to a VIP -> pass",
            client_eth().ipv4(CLIENT_V4, VIP_V4).icmp_echo(7, 1).build(),
            Expect::pass(&[STAT_PASS_NOT_VIP]),
        ),
        Fixture::new(
            "ICMPv6 echo request to a VIP -> pass",
            client_eth()
                .ipv6(CLIENT_V6, VIP_V6)
                .icmpv6_echo(7, 1)
                .build(),
            Expect::pass(&[STAT_PASS_NOT_VIP]),
        ),
    ];

    // Fragments: choose flows whose address-only pick differs from their
    // 5-tuple pick, so hashing with ports would be caught.
    let differs = |f: &Flow| frag_pick(plan, f).id != p(f).id;
    let fu4 = find_flow(
        Flow::udp(CLIENT_V4, 0, VIP_V4, 53),
        44000..45000,
        "a v4 fragment pick != 5-tuple pick",
        differs,
    );
    // TCP to :8080 (an ipip VIP): fragments go through the alias of the
    // address's lowest TCP port (80, DSR), hashed without ports.
    let vip80 = planned_vip(plan, VIP_V4.into(), 80, Protocol::Tcp);
    let ft4 = find_flow(
        Flow::tcp(CLIENT_V4, 0, VIP_V4, 8080),
        44000..45000,
        "a v4 TCP fragment pick != hashing with ports",
        |f| frag_pick(plan, f).id != ring_pick(plan, vip80, &f.key()).id,
    );
    let fu6 = find_flow(
        Flow::udp(CLIENT_V6, 0, VIP_V6, 53),
        44000..45000,
        "a v6 fragment pick != 5-tuple pick",
        differs,
    );
    let f4 = fu4.fragments(1000, 0x4242);
    let t4 = ft4.fragments(1000, 0x4343);
    let f6 = fu6.fragments(1000, 0x0006_4242);
    let nv = Flow::udp(CLIENT_V4, 44001, NOT_VIP_V4, 53).fragments(1000, 0x4444);
    let icmp_frag = client_eth()
        .ipv4(CLIENT_V4, VIP_V4)
        .fragment(0, true, 0x4545)
        .icmp_echo(1, 1)
        .payload(&[0; 64])
        .build();
    let udp_to_tcp_only = Flow::udp(CLIENT_V4, 44002, AFFINITY_VIP, 53).fragments(1000, 0x4646);
    let frag = |f: &Flow| Expect::dsr(&frag_pick(plan, f), false, &[STAT_TX, STAT_FRAGMENT]);
    // Source affinity holds for fragments too: the client's backend.
    let aff = Flow::tcp(CLIENT_V4, 44003, AFFINITY_VIP, 80);
    assert_eq!(
        frag_pick(plan, &aff).id,
        p(&aff).id,
        "fixture precondition: affinity ignores ports"
    );
    let aff_frags = aff.fragments(1000, 0x4848);
    // An IPv6 atomic fragment (offset 0, M clear) is a whole packet (RFC
    // 6946), like an IPv4 packet with MF clear and offset 0.
    let atomic = find_flow(
        Flow::tcp(CLIENT_V6, 0, VIP_V6, 80),
        44100..45000,
        "an atomic-fragment flow whose address-only pick differs",
        differs,
    );
    let atomic_pkt = atomic.frame(client_eth(), TcpFlags::ACK, |b| {
        b.ipv6_ext(ExtHeader::Fragment {
            offset: 0,
            more: false,
            id: 0x99,
        })
    });
    fx.extend([
        Fixture::new("affinity VIP: TCP first fragment -> the client's backend", aff_frags[0].clone(), frag(&aff)),
        Fixture::new("setup: v6 SYN of the flow the atomic fragment belongs to", atomic.syn(), Expect::dsr(&p(&atomic), true, &[STAT_TX, STAT_CONN_MISS])),
        Fixture::new(
            "v6 atomic fragment (offset 0, M clear) of that flow -> its backend, not a fragment (conn hit)",
            atomic_pkt,
            Expect::dsr(&p(&atomic), false, &[STAT_TX, STAT_CONN_HIT]),
        ),
        Fixture::new("v4 UDP first fragment -> address-only pick (fragment, no conn entry)", f4[0].clone(), frag(&fu4)),
        Fixture::new("v4 UDP later fragment of the same datagram -> same backend", f4[1].clone(), frag(&fu4)),
        Fixture::new("v4 TCP first fragment to VIP:8080 -> ring of the address's lowest TCP port (80)", t4[0].clone(), frag(&ft4)),
        Fixture::new("v4 TCP later fragment -> same backend", t4[1].clone(), frag(&ft4)),
        Fixture::new("v6 UDP first fragment (fragment header) -> address-only pick", f6[0].clone(), frag(&fu6)),
        Fixture::new("v6 UDP later fragment of the same datagram -> same backend", f6[1].clone(), frag(&fu6)),
        Fixture::new("v4 fragment to a non-VIP address -> pass", nv[0].clone(), Expect::pass(&[STAT_PASS_NOT_VIP])),
        Fixture::new("v4 UDP fragment to an address with only TCP VIPs -> pass", udp_to_tcp_only[1].clone(), Expect::pass(&[STAT_PASS_NOT_VIP])),
        Fixture::new("v4 ICMP fragment to a VIP -> pass", icmp_frag, Expect::pass(&[STAT_PASS_NOT_VIP])),
    ]);

    // Issue 25, item 2: a destination-options header in the fragmentable
    // part (RFC 8200 4.5). Later fragments carry payload where the first
    // carries that header: every fragment must stop at the Fragment header
    // and take the same key and VIP. The protocol behind the header is
    // unknown in later fragments, so the datagram goes through the
    // address's TCP alias (port 80 here), hashed on addresses.
    let dst_frag = Flow::udp(CLIENT_V6, 44200, VIP_V6, 53);
    let dst_frags = dst_frag
        .builder(client_eth(), TcpFlags::NONE, |b| {
            b.ipv6_ext(ExtHeader::DestOpts { len8: 0 })
        })
        .payload(&[0x3c; 1200])
        .build_fragments_after(512, 0x0006_4343, 0);
    assert_eq!(dst_frags.len(), 3, "fixture bug: want three fragments");
    // The bytes where the first fragment has its destination options are
    // payload in the others; make them look like a header that would
    // lead to UDP, as an attacker or plain data could.
    let tcp_alias = Flow::tcp(CLIENT_V6, 0, VIP_V6, 80);
    let dst_pick = frag_pick(plan, &tcp_alias);
    assert_ne!(
        dst_pick.id,
        frag_pick(plan, &dst_frag).id,
        "fixture precondition: the TCP alias's pick differs from the UDP one's"
    );
    let via_tcp_alias = || Expect::dsr(&dst_pick, false, &[STAT_TX, STAT_FRAGMENT]);
    let mut later = dst_frags[1].clone();
    later[14 + 40 + 8] = 17; // would read as "next header UDP"
    // An IPv6 fragment behind a hop-by-hop header: the unfragmentable part
    // is skipped as before.
    let hbh_frag = Flow::udp(CLIENT_V6, 44201, VIP_V6, 53);
    let hbh_frags = hbh_frag
        .builder(client_eth(), TcpFlags::NONE, |b| {
            b.ipv6_ext(ExtHeader::HopByHop { len8: 0 })
        })
        .payload(&[0x3d; 1200])
        .build_fragments(512, 0x0006_4444);
    fx.extend([
        Fixture::new("v6 first fragment with dest-options in the fragmentable part -> TCP alias, address-only pick", dst_frags[0].clone(), via_tcp_alias()),
        Fixture::new("v6 second fragment of that datagram -> same backend (payload not parsed as a header)", dst_frags[1].clone(), via_tcp_alias()),
        Fixture::new("v6 last fragment of that datagram -> same backend", dst_frags[2].clone(), via_tcp_alias()),
        Fixture::new("v6 later fragment whose payload looks like a UDP header chain -> same backend", later, via_tcp_alias()),
        Fixture::new("v6 first fragment behind hop-by-hop -> UDP alias pick", hbh_frags[0].clone(), frag(&hbh_frag)),
        Fixture::new("v6 later fragment behind hop-by-hop -> same backend", hbh_frags[1].clone(), frag(&hbh_frag)),
    ]);

    // Issue 25, item 3: ICMP errors only for VIPs, only their own flows.
    let twin = prefilter_twin(plan);
    let own = Flow::tcp(CLIENT_V4, 44300, VIP_V4, 80);
    let to_twin = PacketBuilder::eth(ROUTER_MAC, LB_MAC)
        .ipv4(ROUTER_V4, twin)
        .icmp_frag_needed(1400, &own.reply_quote())
        .build();
    // Sent to the affinity VIP's address, quoting a flow of VIP_V4:80.
    let to_other_vip = PacketBuilder::eth(ROUTER_MAC, LB_MAC)
        .ipv4(ROUTER_V4, AFFINITY_VIP)
        .icmp_frag_needed(1400, &own.reply_quote())
        .build();
    let own6 = Flow::tcp(CLIENT_V6, 44301, VIP_V6, 80);
    let to_other6 = PacketBuilder::eth(ROUTER_MAC, LB_MAC)
        .ipv6(ROUTER_V6, NOT_VIP_V6)
        .icmpv6_packet_too_big(1280, &own6.reply_quote())
        .build();
    fx.extend([
        Fixture::new(
            "ICMP frag-needed quoting a VIP flow, sent to a non-VIP address sharing the prefilter bit -> pass",
            to_twin,
            Expect::pass(&[STAT_PASS_NOT_VIP, STAT_ICMP_NOT_OWN_FLOW]),
        ),
        Fixture::new(
            "ICMP frag-needed to one VIP quoting another VIP's flow -> pass",
            to_other_vip,
            Expect::pass(&[STAT_PASS_NOT_VIP, STAT_ICMP_NOT_OWN_FLOW]),
        ),
        Fixture::new(
            "ICMPv6 packet-too-big to a non-VIP address quoting a VIP flow -> pass",
            to_other6,
            if in_vip_filter(plan, IpAddr::V6(NOT_VIP_V6)) {
                Expect::pass(&[STAT_PASS_NOT_VIP, STAT_ICMP_NOT_OWN_FLOW])
            } else {
                Expect::pass(&[STAT_PASS_NOT_VIP])
            },
        ),
        Fixture::new(
            "ICMP frag-needed about a VIP flow, to that VIP, in a frame for another host -> pass",
            {
                let mut f = own.ptb();
                f[..6].copy_from_slice(&backend_mac(9));
                f
            },
            Expect::pass(&[STAT_PASS_OTHER_HOST]),
        ),
    ]);
    fx
}

#[test]
fn icmp_and_fragments() {
    let plan = make_plan(&main_spec(), &IdAllocator::default());
    let fixtures = icmp_frag_fixtures(&plan);
    run_group("icmp+frag", &mut Lb::load(&plan, None), &fixtures);
}

// ===========================================================================
// Group: pass, malformed, no backend
// ===========================================================================

fn pass_fixtures(plan: &MapPlan) -> Vec<Fixture> {
    const L4: usize = 14 + 20;
    const L4_6: usize = 14 + 40;
    let tcp4 = Flow::tcp(CLIENT_V4, 45001, VIP_V4, 80);
    let udp4 = Flow::udp(CLIENT_V4, 45002, VIP_V4, 53);
    let tcp6 = Flow::tcp(CLIENT_V6, 45003, VIP_V6, 80);
    let v4 = |b: PacketBuilder| b.ipv4(CLIENT_V4, VIP_V4);
    let arp = client_eth()
        .ethertype(ETHERTYPE_ARP)
        .raw_payload(&packet::arp_request(CLIENT_MAC, CLIENT_V4, VIP_V4))
        .build();
    let tagged_arp = client_eth()
        .vlan(7)
        .ethertype(ETHERTYPE_ARP)
        .raw_payload(&packet::arp_request(CLIENT_MAC, CLIENT_V4, VIP_V4))
        .build();
    let lldp = client_eth()
        .ethertype(0x88cc)
        .raw_payload(&[0x02, 0x07, 0x04, 0, 0, 0, 0, 0, 1])
        .build();
    assert!(
        !in_vip_filter(plan, NOT_VIP_V4.into()),
        "fixture precondition: {NOT_VIP_V4} misses the prefilter"
    );
    assert!(
        !in_vip_filter(plan, NOT_VIP_V6.into()),
        "fixture precondition: {NOT_VIP_V6} misses the prefilter"
    );
    let twin = prefilter_twin(plan);
    vec![
        Fixture::new(
            "v4 TCP to a non-VIP address -> pass",
            Flow::tcp(CLIENT_V4, 45010, NOT_VIP_V4, 80).syn(),
            Expect::pass(&[STAT_PASS_NOT_VIP]),
        ),
        Fixture::new(
            "v6 TCP to a non-VIP address -> pass",
            Flow::tcp(CLIENT_V6, 45011, NOT_VIP_V6, 80).syn(),
            Expect::pass(&[STAT_PASS_NOT_VIP]),
        ),
        Fixture::new(
            "v4 TCP to a VIP address, other port (443) -> pass",
            Flow::tcp(CLIENT_V4, 45012, VIP_V4, 443).syn(),
            Expect::pass(&[STAT_PASS_NOT_VIP]),
        ),
        Fixture::new(
            "v6 TCP to a VIP address, other port (443) -> pass",
            Flow::tcp(CLIENT_V6, 45013, VIP_V6, 443).syn(),
            Expect::pass(&[STAT_PASS_NOT_VIP]),
        ),
        Fixture::new(
            "v4 UDP to a TCP-only VIP port (80) -> pass",
            Flow::udp(CLIENT_V4, 45014, VIP_V4, 80).dgram(),
            Expect::pass(&[STAT_PASS_NOT_VIP]),
        ),
        Fixture::new(
            "v4 GRE to a VIP address -> pass",
            v4(client_eth()).raw_l4(47).payload(&[0; 8]).build(),
            Expect::pass(&[STAT_PASS_NOT_VIP]),
        ),
        Fixture::new(
            "ARP request -> pass",
            arp,
            Expect::pass(&[STAT_PASS_NON_IP]),
        ),
        Fixture::new(
            "unknown EtherType (LLDP 0x88cc) -> pass",
            lldp,
            Expect::pass(&[STAT_PASS_NON_IP]),
        ),
        Fixture::new(
            "802.1Q-tagged ARP -> pass non-IP",
            tagged_arp,
            Expect::pass(&[STAT_PASS_NON_IP, STAT_VLAN]),
        ),
        Fixture::new(
            "QinQ (802.1ad + 802.1Q): only one tag is parsed -> pass non-IP",
            tcp4.frame(client_eth().qinq(10, 20), TcpFlags::SYN, |b| b),
            Expect::pass(&[STAT_PASS_NON_IP, STAT_VLAN]),
        ),
        Fixture::new(
            "truncated Ethernet (10 bytes) -> pass malformed",
            truncated(tcp4.syn(), 14),
            Expect::pass(&[STAT_PASS_MALFORMED, STAT_ERR_L2_TRUNC]),
        )
        .linear(10),
        Fixture::new(
            "truncated 802.1Q tag (16 bytes) -> pass malformed",
            truncated(tcp4.frame(client_eth().vlan(5), TcpFlags::SYN, |b| b), 16),
            Expect::pass(&[STAT_PASS_MALFORMED, STAT_ERR_L2_TRUNC]),
        ),
        Fixture::new(
            "truncated IPv4 header (10 of 20 bytes) -> pass malformed",
            truncated(tcp4.syn(), 14 + 10),
            Expect::pass(&[STAT_PASS_MALFORMED, STAT_ERR_IPV4_TRUNC]),
        ),
        Fixture::new(
            "IPv4 IHL 15 with the options beyond the frame -> pass malformed",
            udp4.builder(client_eth(), TcpFlags::NONE, |b| {
                b.ipv4_ihl_override(15).ipv4_total_len_override(100)
            })
            .payload(&[])
            .build(),
            Expect::pass(&[STAT_PASS_MALFORMED, STAT_ERR_IPV4_TRUNC]),
        ),
        Fixture::new(
            "IPv4 IHL 4 to a VIP -> pass malformed",
            tcp4.frame(client_eth(), TcpFlags::SYN, |b| b.ipv4_ihl_override(4)),
            Expect::pass(&[STAT_PASS_MALFORMED, STAT_ERR_IPV4_BAD]),
        ),
        Fixture::new(
            "IPv4 EtherType with version 6 to a VIP -> pass malformed",
            tcp4.frame(client_eth(), TcpFlags::SYN, |b| b.ip_version_override(6)),
            Expect::pass(&[STAT_PASS_MALFORMED, STAT_ERR_IPV4_BAD]),
        ),
        Fixture::new(
            "IPv4 total length 12 (< header) -> pass malformed",
            tcp4.frame(client_eth(), TcpFlags::SYN, |b| {
                b.ipv4_total_len_override(12)
            }),
            Expect::pass(&[STAT_PASS_MALFORMED, STAT_ERR_IPV4_BAD]),
        ),
        Fixture::new(
            "IPv6 EtherType with version 4 to a VIP -> pass malformed",
            tcp6.frame(client_eth(), TcpFlags::SYN, |b| b.ip_version_override(4)),
            Expect::pass(&[STAT_PASS_MALFORMED, STAT_ERR_IPV6_BAD]),
        ),
        Fixture::new(
            "truncated IPv6 header (30 of 40 bytes) -> pass malformed",
            truncated(tcp6.syn(), 14 + 30),
            Expect::pass(&[STAT_PASS_MALFORMED, STAT_ERR_IPV6_TRUNC]),
        ),
        Fixture::new(
            "truncated IPv6 hop-by-hop header (1 byte) -> pass malformed",
            truncated(
                tcp6.frame(client_eth(), TcpFlags::SYN, |b| {
                    b.ipv6_ext(ExtHeader::HopByHop { len8: 0 })
                }),
                L4_6 + 1,
            ),
            Expect::pass(&[STAT_PASS_MALFORMED, STAT_ERR_IPV6_TRUNC]),
        ),
        Fixture::new(
            "truncated IPv6 fragment header (6 of 8 bytes) -> pass malformed",
            truncated(
                tcp6.frame(client_eth(), TcpFlags::ACK, |b| {
                    b.ipv6_ext(ExtHeader::Fragment {
                        offset: 0,
                        more: true,
                        id: 5,
                    })
                }),
                L4_6 + 6,
            ),
            Expect::pass(&[STAT_PASS_MALFORMED, STAT_ERR_IPV6_TRUNC]),
        ),
        Fixture::new(
            "v6 with 5 extension headers (over the limit) -> pass",
            tcp6.frame(client_eth(), TcpFlags::SYN, |b| {
                b.ipv6_ext(ExtHeader::HopByHop { len8: 0 })
                    .ipv6_ext(ExtHeader::DestOpts { len8: 0 })
                    .ipv6_ext(ExtHeader::Routing {
                        len8: 0,
                        routing_type: 0,
                        segments_left: 0,
                    })
                    .ipv6_ext(ExtHeader::DestOpts { len8: 0 })
                    .ipv6_ext(ExtHeader::DestOpts { len8: 0 })
            }),
            Expect::pass(&[STAT_PASS_MALFORMED, STAT_ERR_IPV6_EXT_LIMIT]),
        ),
        Fixture::new(
            "TCP to a VIP cut to 2 bytes (no ports) -> drop",
            truncated(tcp4.syn(), L4 + 2),
            Expect::drop(&[STAT_DROP_MALFORMED_L4, STAT_ERR_L4_TRUNC]),
        ),
        Fixture::new(
            "TCP to VIP:80 cut to 12 bytes (ports, no full header) -> drop",
            truncated(tcp4.syn(), L4 + 12),
            Expect::drop(&[STAT_DROP_MALFORMED_L4, STAT_ERR_L4_TRUNC]),
        ),
        Fixture::new(
            "TCP to VIP:80 with data offset 4 -> drop",
            patched(tcp4.syn(), L4 + 12, 0x40),
            Expect::drop(&[STAT_DROP_MALFORMED_L4, STAT_ERR_L4_TRUNC]),
        ),
        Fixture::new(
            "UDP to VIP:53 cut to 6 bytes -> drop",
            truncated(udp4.dgram(), L4 + 6),
            Expect::drop(&[STAT_DROP_MALFORMED_L4, STAT_ERR_L4_TRUNC]),
        ),
        Fixture::new(
            "v6 TCP to VIP:80 cut to 10 bytes -> drop",
            truncated(tcp6.syn(), L4_6 + 10),
            Expect::drop(&[STAT_DROP_MALFORMED_L4, STAT_ERR_L4_TRUNC]),
        ),
        Fixture::new(
            "TCP to a non-VIP address cut to 2 bytes -> pass (the prefilter rules the address out)",
            truncated(Flow::tcp(CLIENT_V4, 45015, NOT_VIP_V4, 80).syn(), L4 + 2),
            Expect::pass(&[STAT_PASS_NOT_VIP]),
        ),
        Fixture::new(
            "TCP to a non-VIP address sharing a VIP's prefilter bit -> pass (lookup says no VIP)",
            Flow::tcp(CLIENT_V4, 45019, twin, 80).syn(),
            Expect::pass(&[STAT_PASS_NOT_VIP]),
        ),
        Fixture::new(
            "TCP to that prefilter twin cut to 2 bytes -> pass malformed (no VIP on the address)",
            truncated(Flow::tcp(CLIENT_V4, 45020, twin, 80).syn(), L4 + 2),
            Expect::pass(&[STAT_PASS_MALFORMED, STAT_ERR_L4_TRUNC]),
        ),
        Fixture::new(
            "v4 fragment to that prefilter twin -> pass",
            Flow::udp(CLIENT_V4, 45021, twin, 53).fragments(1000, 0x4747)[0].clone(),
            Expect::pass(&[STAT_PASS_NOT_VIP]),
        ),
        Fixture::new(
            "TCP to a VIP address, non-VIP port, cut to 12 bytes -> pass (ports say: not a VIP)",
            truncated(Flow::tcp(CLIENT_V4, 45016, VIP_V4, 443).syn(), L4 + 12),
            Expect::pass(&[STAT_PASS_NOT_VIP]),
        ),
        Fixture::new(
            "SYN to a VIP with no backends -> drop",
            Flow::tcp(CLIENT_V4, 45017, EMPTY_VIP, 80).syn(),
            Expect::drop(&[STAT_DROP_NO_BACKEND]),
        ),
        Fixture::new(
            "SYN to a VIP whose backends all weigh 0 -> drop",
            Flow::tcp(CLIENT_V4, 45018, ZERO_WEIGHT_VIP, 80).syn(),
            Expect::drop(&[STAT_DROP_NO_BACKEND]),
        ),
    ]
}

#[test]
fn pass_malformed_and_no_backend() {
    let plan = make_plan(&main_spec(), &IdAllocator::default());
    let fixtures = pass_fixtures(&plan);
    run_group("pass", &mut Lb::load(&plan, None), &fixtures);
}

// ===========================================================================
// Group: connection table across configuration changes
// ===========================================================================

/// `spec` with the backends of its first VIP (v4 TCP :80) edited.
fn edit_first_vip(spec: &DataplaneSpec, f: impl FnOnce(&mut Vec<BackendSpec>)) -> DataplaneSpec {
    let mut s = spec.clone();
    assert_eq!(
        (s.vips[0].address, s.vips[0].port),
        (IpAddr::V4(VIP_V4), 80),
        "fixture bug: first VIP"
    );
    f(&mut s.vips[0].backends);
    s.generation += 1;
    s
}

fn set_state(addr: IpAddr, state: BackendState) -> impl FnOnce(&mut Vec<BackendSpec>) {
    move |bs| {
        let b = bs
            .iter_mut()
            .find(|b| b.address == addr)
            .expect("fixture bug: no such backend");
        b.state = state;
    }
}

fn conn_table_fixtures() -> (MapPlan, Vec<Fixture>) {
    let s1 = scenario::standard(3);
    let p1 = make_plan(&s1, &IdAllocator::default());
    // Table change: a fourth backend joins.
    let s2 = edit_first_vip(&s1, |bs| *bs = scenario::backends(4, false));
    let p2 = make_plan(&s2, &p1.allocator);
    let base = Flow::tcp(CLIENT_V4, 0, VIP_V4, 80);
    let moved = |f: &Flow| pick(&p1, f).id != pick(&p2, f).id;
    let f = find_flow(
        base,
        46000..47000,
        "a flow the new table maps elsewhere",
        moved,
    );
    let g = find_flow(
        base,
        f.sport + 1..47000,
        "a second flow the new table maps elsewhere",
        moved,
    );

    let mut fx = vec![
        Fixture::new(
            "table 1: SYN of flow F -> its table-1 backend",
            f.syn(),
            Expect::dsr(&pick(&p1, &f), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "table 2 (backend added): ACK of F -> still its table-1 backend (conn hit)",
            f.ack(),
            Expect::dsr(&pick(&p1, &f), false, &[STAT_TX, STAT_CONN_HIT]),
        )
        .after_apply(&p2),
        Fixture::new(
            "table 2: ICMP frag-needed about F -> F's table-1 backend (conn hit)",
            f.ptb(),
            Expect::dsr(&pick(&p1, &f), false, &[STAT_TX, STAT_ICMP_PTB]),
        ),
        Fixture::new(
            "table 2: SYN of another flow G -> its table-2 backend",
            g.syn(),
            Expect::dsr(&pick(&p2, &g), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "table 2: ACK of G -> same backend (conn hit)",
            g.ack(),
            Expect::dsr(&pick(&p2, &g), false, &[STAT_TX, STAT_CONN_HIT]),
        ),
        Fixture::new(
            "table 2: SYN reusing F's 5-tuple -> fresh pick from table 2",
            f.syn(),
            Expect::dsr(&pick(&p2, &f), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "table 2: ACK of F -> the new entry's backend (conn hit)",
            f.ack(),
            Expect::dsr(&pick(&p2, &f), false, &[STAT_TX, STAT_CONN_HIT]),
        ),
    ];

    // A backend goes down: its established flow is re-picked.
    let d = base.port(47000);
    let x = pick(&p2, &d);
    let s3 = edit_first_vip(&s2, set_state(x.addr, BackendState::Down));
    let p3 = make_plan(&s3, &p2.allocator);
    assert_ne!(
        pick(&p3, &d).id,
        x.id,
        "fixture precondition: a Down backend is not in the ring"
    );
    fx.extend([
        Fixture::new(
            "table 2: SYN of flow D -> backend X",
            d.syn(),
            Expect::dsr(&x, true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "X down: ACK of D -> stale entry, re-picked from table 3",
            d.ack(),
            Expect::dsr(
                &pick(&p3, &d),
                true,
                &[STAT_TX, STAT_CONN_STALE, STAT_CONN_MISS],
            ),
        )
        .after_apply(&p3),
        Fixture::new(
            "X down: next ACK of D -> the new entry (conn hit)",
            d.ack(),
            Expect::dsr(&pick(&p3, &d), false, &[STAT_TX, STAT_CONN_HIT]),
        ),
    ]);

    // A backend drains: established flows stay, new ones go elsewhere.
    let e = base.port(47001);
    let y = pick(&p3, &e);
    let s4 = edit_first_vip(&s3, set_state(y.addr, BackendState::Drain));
    let p4 = make_plan(&s4, &p3.allocator);
    let k = find_flow(
        base,
        47002..48000,
        "a flow whose table-3 backend is Y",
        |k| pick(&p3, k).id == y.id,
    );
    assert_ne!(
        pick(&p4, &k).id,
        y.id,
        "fixture precondition: a draining backend is not in the ring"
    );
    assert_ne!(
        pick(&p4, &e).id,
        y.id,
        "fixture precondition: a draining backend is not in the ring"
    );
    fx.extend([
        Fixture::new(
            "table 3: SYN of flow E -> backend Y",
            e.syn(),
            Expect::dsr(&y, true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "Y draining: ACK of E -> still Y (conn hit)",
            e.ack(),
            Expect::dsr(&y, false, &[STAT_TX, STAT_CONN_HIT]),
        )
        .after_apply(&p4),
        Fixture::new(
            "Y draining: SYN of flow K (table 3 said Y) -> another backend",
            k.syn(),
            Expect::dsr(&pick(&p4, &k), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "Y draining: SYN reusing E's 5-tuple -> not Y (new connection)",
            e.syn(),
            Expect::dsr(&pick(&p4, &e), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
    ]);

    // A backend is removed, then its id is reused by a new backend with the
    // next generation: old entries must not capture the new owner.
    let r1 = base.port(48000);
    let z = pick(&p4, &r1);
    let r2 = find_flow(base, 48001..49000, "a second flow on backend Z", |r| {
        pick(&p4, r).id == z.id
    });
    let s5 = edit_first_vip(&s4, |bs| bs.retain(|b| b.address != z.addr));
    let p5 = make_plan(&s5, &p4.allocator);
    let p6 = make_plan(&s5, &p5.allocator); // one plan later the id is free again
    let s7 = edit_first_vip(&s5, |bs| {
        bs.push(backend(backend_v4(50), Some(backend_mac(50))));
    });
    let p7 = make_plan(&s7, &p6.allocator);
    let reused = p7
        .backends
        .iter()
        .find(|b| b.address == IpAddr::V4(backend_v4(50)))
        .expect("new backend planned");
    let old_gen = p4
        .backends
        .iter()
        .find(|b| b.id == z.id)
        .expect("Z planned")
        .entry
        .generation;
    assert_eq!(
        (reused.id, reused.entry.generation),
        (z.id, old_gen.wrapping_add(1)),
        "fixture precondition: the planner reuses Z's id with the next generation"
    );
    fx.extend([
        Fixture::new(
            "table 4: SYN of flow R1 -> backend Z",
            r1.syn(),
            Expect::dsr(&z, true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "table 4: SYN of flow R2 -> backend Z",
            r2.syn(),
            Expect::dsr(&z, true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "Z removed: ACK of R1 -> stale entry, re-picked",
            r1.ack(),
            Expect::dsr(
                &pick(&p5, &r1),
                true,
                &[STAT_TX, STAT_CONN_STALE, STAT_CONN_MISS],
            ),
        )
        .after_apply(&p5),
        Fixture::new(
            "Z's id reused by a new backend (generation + 1): ACK of R2 -> stale, re-picked",
            r2.ack(),
            Expect::dsr(
                &pick(&p7, &r2),
                true,
                &[STAT_TX, STAT_CONN_STALE, STAT_CONN_MISS],
            ),
        )
        .after_apply(&p6)
        .after_apply(&p7),
    ]);

    // Every backend down: an established flow is dropped.
    let s8 = edit_first_vip(&s7, |bs| {
        for b in bs {
            b.state = BackendState::Down;
        }
    });
    let p8 = make_plan(&s8, &p7.allocator);
    // The VIP is removed altogether.
    let mut s9 = s8.clone();
    s9.vips.remove(0);
    let p9 = make_plan(&s9, &p8.allocator);
    fx.extend([
        Fixture::new(
            "all backends down: ACK of G -> stale, no backend, drop",
            g.ack(),
            Expect::drop(&[STAT_DROP_NO_BACKEND, STAT_CONN_STALE]),
        )
        .after_apply(&p8),
        Fixture::new(
            "all backends down: SYN -> drop",
            base.port(49000).syn(),
            Expect::drop(&[STAT_DROP_NO_BACKEND]),
        ),
        Fixture::new(
            "VIP removed: ACK of G -> pass",
            g.ack(),
            Expect::pass(&[STAT_PASS_NOT_VIP]),
        )
        .after_apply(&p9),
    ]);
    (p1, fx)
}

#[test]
fn connection_table() {
    let (plan, fixtures) = conn_table_fixtures();
    run_group("conn", &mut Lb::load(&plan, None), &fixtures);
}

// ===========================================================================
// Group: IP-in-IP (in a network namespace)
// ===========================================================================

fn ipip_spec() -> DataplaneSpec {
    use ForwardingMode::Ipip;
    let mut s = scenario::standard(3);
    s.vips.extend([
        vip_spec(
            NO_NEIGH_VIP_V4,
            8080,
            Protocol::Tcp,
            Ipip,
            vec![backend(NO_NEIGH_BACKEND_V4, None)],
        ),
        vip_spec(
            NO_NEIGH_VIP_V6,
            8080,
            Protocol::Tcp,
            Ipip,
            vec![backend(NO_NEIGH_BACKEND_V6, None)],
        ),
        vip_spec(
            NO_ROUTE_VIP_V4,
            8080,
            Protocol::Tcp,
            Ipip,
            vec![backend(NO_ROUTE_BACKEND_V4, None)],
        ),
        vip_spec(
            FRAG_VIP_V4,
            4000,
            Protocol::Udp,
            Ipip,
            (1..=3).map(|i| backend(backend_v4(i), None)).collect(),
        ),
        vip_spec(
            REDIR_VIP_V4,
            8080,
            Protocol::Tcp,
            Ipip,
            vec![backend(REDIR_BACKEND_V4, None)],
        ),
        vip_spec(
            REDIR_VIP_V6,
            8080,
            Protocol::Tcp,
            Ipip,
            vec![backend(REDIR_BACKEND_V6, None)],
        ),
        vip_spec(
            SMALL_MTU_VIP_V4,
            8080,
            Protocol::Tcp,
            Ipip,
            vec![backend(SMALL_MTU_BACKEND_V4, None)],
        ),
        vip_spec(
            SMALL_MTU_VIP_V6,
            8080,
            Protocol::Tcp,
            Ipip,
            vec![backend(SMALL_MTU_BACKEND_V6, None)],
        ),
    ]);
    s
}

/// The ICMP "fragmentation needed" / ICMPv6 "packet too big" the program
/// must answer `input` with (its IP header at `l2`): back to the sender's
/// MAC from ours, behind the same VLAN tag, from the VIP to the client,
/// TTL/hop limit 64, quoting the first 548 (IPv4) / 1232 (IPv6) bytes of
/// the packet. Built by the test's own packet builder (its own checksums).
fn too_big_reply(input: &[u8], l2: usize, mtu: u32) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&input[6..12]);
    out.extend_from_slice(&input[..6]);
    out.extend_from_slice(&input[12..l2]);
    let ip = &input[l2..];
    let b = if ip[0] >> 4 == 4 {
        let a = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
        PacketBuilder::new()
            .ipv4(a(16), a(12))
            .icmp_frag_needed(u16::try_from(mtu).expect("v4 MTU"), &ip[..548])
    } else {
        let a =
            |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&ip[at..at + 16]).expect("16 bytes"));
        PacketBuilder::new()
            .ipv6(a(24), a(8))
            .icmpv6_packet_too_big(mtu, &ip[..1232])
    };
    out.extend_from_slice(&b.build_ip_only());
    out
}

fn ipip_fixtures(plan: &MapPlan) -> Vec<Fixture> {
    let tcp4 = Flow::tcp(CLIENT_V4, 50001, VIP_V4, 8080);
    let tcp6 = Flow::tcp(CLIENT_V6, 50002, VIP_V6, 8080);
    let (tos4, opts4, tc6, vlan4, ad6) = (
        tcp4.port(50003),
        tcp4.port(50004),
        tcp6.port(50005),
        tcp4.port(50006),
        tcp6.port(50007),
    );
    let (mtu_ok4, mtu_big4, mtu_big6) = (tcp4.port(50008), tcp4.port(50009), tcp6.port(50010));
    let p = |f: &Flow| pick(plan, f);
    let tx =
        |f: &Flow, new_flow: bool, stats: &[u32]| Expect::ipip_tx(&p(f), &f.key(), new_flow, stats);
    let sized = |f: &Flow, payload: usize| {
        f.builder(client_eth(), TcpFlags::ACK, |b| b)
            .payload(&vec![0x5a; payload])
            .build()
    };

    let mut fx = vec![
        Fixture::new(
            "v4 SYN to an ipip VIP -> IPv4-in-IPv4 to the ring's backend, XDP_TX via lbA",
            tcp4.syn(),
            tx(&tcp4, true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v4 ACK of that flow -> same encapsulation (conn hit)",
            tcp4.ack(),
            tx(&tcp4, false, &[STAT_TX, STAT_CONN_HIT]),
        ),
        Fixture::new(
            "v6 SYN to an ipip VIP -> IPv6-in-IPv6, flow label from the hash",
            tcp6.syn(),
            tx(&tcp6, true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v6 ACK of that flow -> same encapsulation (conn hit)",
            tcp6.ack(),
            tx(&tcp6, false, &[STAT_TX, STAT_CONN_HIT]),
        ),
        Fixture::new(
            "v4 with TOS 0xb8 -> outer TOS copied",
            tos4.frame(client_eth(), TcpFlags::SYN, |b| b.tos(0xb8)),
            tx(&tos4, true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v4 with IP options -> outer length = inner (with options) + 20",
            opts4.frame(client_eth(), TcpFlags::SYN, |b| {
                b.ipv4_options(&[1, 1, 1, 1, 1, 1, 1, 1])
            }),
            tx(&opts4, true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v6 with traffic class 0x2e and a flow label -> traffic class copied",
            tc6.frame(client_eth(), TcpFlags::SYN, |b| {
                b.tos(0x2e).flow_label(0x12345)
            }),
            tx(&tc6, true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "802.1Q-tagged v4 -> encapsulated behind the same tag",
            vlan4.frame(client_eth().vlan(100), TcpFlags::SYN, |b| b),
            tx(&vlan4, true, &[STAT_TX, STAT_CONN_MISS, STAT_VLAN]),
        ),
        Fixture::new(
            "802.1ad-tagged v6 -> encapsulated behind the same tag",
            ad6.frame(client_eth().vlan_8021ad(300), TcpFlags::SYN, |b| b),
            tx(&ad6, true, &[STAT_TX, STAT_CONN_MISS, STAT_VLAN]),
        ),
        Fixture::new(
            "ICMP frag-needed about the v4 ipip flow -> encapsulated to its backend (conn hit)",
            tcp4.ptb(),
            tx(&tcp4, false, &[STAT_TX, STAT_ICMP_PTB]),
        ),
        Fixture::new(
            "ICMPv6 packet-too-big about the v6 ipip flow -> encapsulated to its backend (conn hit)",
            tcp6.ptb(),
            tx(&tcp6, false, &[STAT_TX, STAT_ICMP_PTB]),
        ),
        Fixture::new(
            "v4 inner 1480 bytes -> outer exactly the MTU (1500) -> XDP_TX",
            sized(&mtu_ok4, 1440),
            tx(&mtu_ok4, true, &[STAT_TX, STAT_CONN_MISS]),
        ),
    ];

    let fu4 = find_flow(
        Flow::udp(CLIENT_V4, 0, FRAG_VIP_V4, 4000),
        51000..52000,
        "a fragment pick != 5-tuple pick",
        |f| frag_pick(plan, f).id != p(f).id,
    );
    let frags = fu4.fragments(1000, 0x5151);
    let frag = |f: &Flow| {
        Expect::ipip_tx(
            &frag_pick(plan, f),
            &f.key().without_ports(),
            false,
            &[STAT_TX, STAT_FRAGMENT],
        )
    };
    fx.extend([
        Fixture::new(
            "v4 UDP first fragment to an ipip VIP -> encapsulated to the address-only pick",
            frags[0].clone(),
            frag(&fu4),
        ),
        Fixture::new(
            "v4 UDP later fragment -> same backend, encapsulated",
            frags[1].clone(),
            frag(&fu4),
        ),
    ]);

    // Route lookup failures and the egress map.
    let no_route = |stats: &[u32]| Expect::drop(stats).traffic(Traffic::Unchecked);
    fx.extend(too_big_fixtures(plan, &tcp4, mtu_big4, mtu_big6));
    let nn4 = Flow::tcp(CLIENT_V4, 52001, NO_NEIGH_VIP_V4, 8080);
    let redir4 = Flow::tcp(CLIENT_V4, 52002, REDIR_VIP_V4, 8080);
    let redir6 = Flow::tcp(CLIENT_V6, 52003, REDIR_VIP_V6, 8080);
    let via_lbc = |f: &Flow, action: u32, stats: &[u32], traffic: Traffic| Expect {
        action,
        output: Out::Ipip(IpipOut {
            backend: p(f).addr,
            dmac: REDIR_BACKEND_MAC,
            smac: LBC_MAC,
            hash: flow_hash(&f.key(), SEED),
        }),
        stats: ones(stats),
        traffic,
    };
    let counted = |f: &Flow| Traffic::Counted {
        vip: p(f).vip_id,
        backend: p(f).id,
        new_flow: true,
    };
    fx.extend([
        Fixture::new(
            "v4 backend without a neighbour entry -> drop (no route)",
            nn4.syn(),
            no_route(&[STAT_DROP_NO_ROUTE, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v6 backend without a neighbour entry -> drop (no route)",
            Flow::tcp(CLIENT_V6, 52004, NO_NEIGH_VIP_V6, 8080).syn(),
            no_route(&[STAT_DROP_NO_ROUTE, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v4 backend without any route -> drop (no route)",
            Flow::tcp(CLIENT_V4, 52005, NO_ROUTE_VIP_V4, 8080).syn(),
            no_route(&[STAT_DROP_NO_ROUTE, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "a packet dropped for no route is not counted as VIP/backend traffic",
            nn4.port(52006).syn(),
            Expect::drop(&[STAT_DROP_NO_ROUTE, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v4 route leaves by lbC, not in the egress map -> drop (redirect)",
            redir4.syn(),
            via_lbc(
                &redir4,
                XDP_DROP,
                &[STAT_DROP_REDIRECT, STAT_CONN_MISS],
                Traffic::Unchecked,
            ),
        ),
        Fixture::new(
            "lbC allowed as egress: v4 route via lbC -> XDP_REDIRECT with lbC's MACs",
            redir4.port(52007).syn(),
            via_lbc(
                &redir4.port(52007),
                XDP_REDIRECT,
                &[STAT_REDIRECT, STAT_CONN_MISS],
                counted(&redir4.port(52007)),
            ),
        )
        .after(Before::AllowEgress(LBC)),
        Fixture::new(
            "lbC allowed as egress: v6 route via lbC -> XDP_REDIRECT with lbC's MACs",
            redir6.syn(),
            via_lbc(
                &redir6,
                XDP_REDIRECT,
                &[STAT_REDIRECT, STAT_CONN_MISS],
                counted(&redir6),
            ),
        ),
    ]);
    fx
}

/// Issue 25, items 1, 4 and 6: packets that do not fit once encapsulated,
/// and lengths that lie. `tcp4` is an established flow of the v4 ipip VIP.
fn too_big_fixtures(plan: &MapPlan, tcp4: &Flow, big4: Flow, big6: Flow) -> Vec<Fixture> {
    let p = |f: &Flow| pick(plan, f);
    // An ACK of `len` IP bytes (TCP, 20-byte headers), DF set if `df`.
    let sized = |f: &Flow, eth: PacketBuilder, len: usize, df: bool| {
        let l3 = if f.src.is_ipv4() { 20 } else { 40 };
        f.builder(
            eth,
            TcpFlags::ACK,
            |b| if df { b.dont_fragment() } else { b },
        )
        .payload(&vec![0x5a; len - l3 - 20])
        .build()
    };
    let tx =
        |f: &Flow, new_flow: bool, stats: &[u32]| Expect::ipip_tx(&p(f), &f.key(), new_flow, stats);
    let icmp = |input: &[u8], l2: usize, mtu: u32, stats: &[u32]| {
        Expect::exact(XDP_TX, too_big_reply(input, l2, mtu), stats)
    };
    let big4_df = sized(&big4, client_eth(), 1481, true);
    let big4_vlan = sized(&big4.port(50020), client_eth().vlan(100), 1481, true);
    let big6_pkt = sized(&big6, client_eth(), 1461, false);
    let est_big = sized(tcp4, client_eth(), 1500, true);
    let small4 = Flow::tcp(CLIENT_V4, 50021, SMALL_MTU_VIP_V4, 8080);
    let small6 = Flow::tcp(CLIENT_V6, 50022, SMALL_MTU_VIP_V6, 8080);
    let small4_big = sized(&small4, client_eth(), 1401, true);
    let small6_big = sized(&small6, client_eth(), 1361, false);
    // An ICMP error about the established flow, itself too big once
    // encapsulated (a 1460-byte quote).
    let mut quote = tcp4.reply_quote();
    quote.resize(1460, 0);
    let big_error = tcp4.ptb_with_quote(&quote);
    let from_multicast = sized(
        &tcp4.port(50023).from(Ipv4Addr::new(224, 0, 0, 9)),
        client_eth(),
        1481,
        true,
    );
    let lying4 = big4.port(50024).frame(client_eth(), TcpFlags::SYN, |b| {
        b.ipv4_total_len_override(200)
    });
    let lying6 = big6.port(50025).frame(client_eth(), TcpFlags::SYN, |b| {
        b.ipv6_payload_len_override(300)
    });
    vec![
        Fixture::new(
            "v4 1480 bytes with DF -> outer exactly the MTU (1500) -> encapsulated",
            sized(&big4.port(50026), client_eth(), 1480, true),
            tx(&big4.port(50026), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v4 1481 bytes without DF -> counted drop (no fragmenting in XDP, no ICMP)",
            sized(&big4, client_eth(), 1481, false),
            Expect::drop(&[STAT_DROP_TOO_BIG, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v4 1481 bytes with DF -> ICMP frag-needed, MTU 1480, from the VIP, 548 bytes quoted",
            big4_df.clone(),
            icmp(&big4_df, 14, 1480, &[STAT_TX_ICMP_TOO_BIG]),
        ),
        Fixture::new(
            "802.1Q-tagged v4 1481 bytes with DF -> ICMP behind the same tag",
            big4_vlan.clone(),
            icmp(
                &big4_vlan,
                18,
                1480,
                &[STAT_TX_ICMP_TOO_BIG, STAT_CONN_MISS, STAT_VLAN],
            ),
        ),
        Fixture::new(
            "v6 1460 bytes -> outer exactly the MTU (1500) -> encapsulated",
            sized(&big6.port(50027), client_eth(), 1460, false),
            tx(&big6.port(50027), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v6 1461 bytes -> ICMPv6 packet-too-big, MTU 1460, from the VIP, 1232 bytes quoted",
            big6_pkt.clone(),
            icmp(&big6_pkt, 14, 1460, &[STAT_TX_ICMP_TOO_BIG, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "established v4 flow, 1500 bytes with DF -> ICMP, no conn hit counted (not sent to its backend)",
            est_big.clone(),
            icmp(&est_big, 14, 1480, &[STAT_TX_ICMP_TOO_BIG]),
        ),
        Fixture::new(
            "v4 route MTU 1400 below the configured 1500: 1401 bytes with DF -> ICMP with MTU 1380",
            small4_big.clone(),
            icmp(
                &small4_big,
                14,
                SMALL_ROUTE_MTU - 20,
                &[STAT_TX_ICMP_TOO_BIG, STAT_CONN_MISS],
            ),
        ),
        Fixture::new(
            "v6 route MTU 1400: 1361 bytes -> ICMPv6 with MTU 1360",
            small6_big.clone(),
            icmp(
                &small6_big,
                14,
                SMALL_ROUTE_MTU - 40,
                &[STAT_TX_ICMP_TOO_BIG, STAT_CONN_MISS],
            ),
        ),
        Fixture::new(
            "v4 route MTU 1400: 1380 bytes -> encapsulated (outer 1400)",
            sized(&small4.port(50028), client_eth(), 1380, true),
            tx(&small4.port(50028), true, &[STAT_TX, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "ICMP error about an ipip flow, too big once encapsulated -> counted drop, never an error about an error",
            big_error,
            Expect::drop(&[STAT_DROP_TOO_BIG]),
        ),
        Fixture::new(
            "too big with DF from a multicast source -> counted drop, no ICMP",
            from_multicast,
            Expect::drop(&[STAT_DROP_TOO_BIG, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v4 total length beyond the frame -> counted drop before encapsulation",
            lying4,
            Expect::drop(&[STAT_DROP_BAD_LENGTH, STAT_CONN_MISS]),
        ),
        Fixture::new(
            "v6 payload length beyond the frame -> counted drop before encapsulation",
            lying6,
            Expect::drop(&[STAT_DROP_BAD_LENGTH, STAT_CONN_MISS]),
        ),
    ]
}

#[test]
fn ipip_forwarding() {
    let plan = make_plan(&ipip_spec(), &IdAllocator::default());
    let fixtures = ipip_fixtures(&plan);
    let ns = Netns::create();
    ns.setup();
    let name = ns.name.clone();
    let res = std::thread::Builder::new()
        .name("lbfx-ipip".into())
        .spawn(move || {
            Netns::enter(&name);
            let ingress = ifindex(LBA);
            run_group("ipip", &mut Lb::load(&plan, Some(ingress)), &fixtures);
        })
        .expect("spawning the namespace thread")
        .join();
    drop(ns);
    if let Err(panic) = res {
        std::panic::resume_unwind(panic);
    }
}

/// The ICMP too-big answers are rate-limited per CPU (burst
/// `ICMP_TOO_BIG_BURST`, then one per `ICMP_TOO_BIG_INTERVAL_NS`): 300
/// too-big packets sent back to back get at most a burst per CPU plus what
/// the elapsed time refills, and every other one is counted as limited.
#[test]
fn icmp_too_big_is_rate_limited() {
    use lb_common::{ICMP_TOO_BIG_BURST, ICMP_TOO_BIG_INTERVAL_NS, STAT_DROP_TOO_BIG_RATE_LIMITED};
    const N: u64 = 300;
    let plan = make_plan(&ipip_spec(), &IdAllocator::default());
    let ns = Netns::create();
    ns.setup();
    let name = ns.name.clone();
    let res = std::thread::Builder::new()
        .name("lbfx-rate".into())
        .spawn(move || {
            Netns::enter(&name);
            let mut lb = Lb::load(&plan, Some(ifindex(LBA)));
            let flow = Flow::tcp(CLIENT_V4, 53500, VIP_V4, 8080);
            let packet = flow
                .builder(client_eth(), TcpFlags::ACK, PacketBuilder::dont_fragment)
                .payload(&[0x5a; 1500 - 40])
                .build();
            let before = lb.snapshot();
            let t0 = Instant::now();
            for _ in 0..N {
                lb.run(&packet, None).expect("test run");
            }
            let elapsed_ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let after = lb.snapshot();
            let delta = |s: u32| after.global[s as usize] - before.global[s as usize];
            let (sent, limited) = (delta(STAT_TX_ICMP_TOO_BIG), delta(STAT_DROP_TOO_BIG_RATE_LIMITED));
            let cpus = u64::try_from(aya::util::nr_cpus().expect("CPU count")).expect("CPUs");
            let most = cpus * ICMP_TOO_BIG_BURST + elapsed_ns / ICMP_TOO_BIG_INTERVAL_NS + cpus;
            println!(
                "[rate] {N} too-big packets in {:.1} ms: {sent} answered, {limited} limited (at most {most} may be answered)",
                elapsed_ns as f64 / 1e6
            );
            assert_eq!(sent + limited, N, "every too-big packet is answered or limited");
            assert!(sent >= ICMP_TOO_BIG_BURST, "a whole burst must be answered, got {sent}");
            assert!(sent <= most, "{sent} answered, more than the limit allows ({most})");
        })
        .expect("spawning the namespace thread")
        .join();
    drop(ns);
    if let Err(panic) = res {
        std::panic::resume_unwind(panic);
    }
}

// ===========================================================================
// Group: xdp_decap
// ===========================================================================

fn decap_fixtures() -> Vec<Fixture> {
    let o4 = |a: [u8; 4]| IpAddr::V4(Ipv4Addr::from(a));
    let (lb4, be4) = (o4([198, 19, 255, 7]), o4([198, 18, 2, 1]));
    let (lb6, be6) = (IpAddr::V6(IPIP_SRC_V6), IpAddr::V6(backend_v6(1)));
    let eth = || PacketBuilder::eth(LBA_MAC, backend_mac(1));
    let tcp4 = Flow::tcp(CLIENT_V4, 53001, VIP_V4, 8080);
    let tcp6 = Flow::tcp(CLIENT_V6, 53002, VIP_V6, 8080);
    let inner4 = tcp4.frame(eth(), TcpFlags::SYN, |b| b);
    let inner6 = tcp6.frame(eth(), TcpFlags::SYN, |b| b);
    let inner4_q = tcp4.frame(eth().vlan(100), TcpFlags::SYN, |b| b);
    let inner6_ad = tcp6.frame(eth().vlan_8021ad(300), TcpFlags::ACK, |b| b);
    let enc = |frame: &[u8], s: IpAddr, d: IpAddr| encap_ip(frame, s, d).expect("encap_ip");
    let (enc4, enc6) = (enc(&inner4, lb4, be4), enc(&inner6, lb6, be6));
    // Outer IPv4 header with options (IHL 6), built as two layers.
    let outer_with_opts = eth()
        .ipv4(Ipv4Addr::new(198, 19, 255, 7), backend_v4(1))
        .ipv4_options(&[1, 1, 1, 1]);
    let enc4_opts = tcp4.frame(outer_with_opts, TcpFlags::SYN, |b| b);
    // IPv4 (protocol 41) / IPv6 / IPv6: IPv6 inside IPv4 is not stripped.
    let ip6_in_ip4 = enc(&enc(&inner6, lb6, be6), lb4, be4);
    let v6_with_ext = eth()
        .ipv6(IPIP_SRC_V6, backend_v6(1))
        .ipv6_ext(ExtHeader::DestOpts { len8: 0 })
        .ipv6(CLIENT_V6, VIP_V6)
        .tcp(53003, 8080, TcpFlags::SYN)
        .payload(PAYLOAD)
        .build();
    let arp = eth()
        .ethertype(ETHERTYPE_ARP)
        .raw_payload(&packet::arp_request(LBA_MAC, CLIENT_V4, VIP_V4))
        .build();
    vec![
        Fixture::new(
            "IPv4-in-IPv4 -> pass, outer header removed",
            enc4.clone(),
            Expect::exact(XDP_PASS, inner4.clone(), &[DECAP_V4]),
        ),
        Fixture::new(
            "IPv6-in-IPv6 -> pass, outer header removed",
            enc6.clone(),
            Expect::exact(XDP_PASS, inner6.clone(), &[DECAP_V6]),
        ),
        Fixture::new(
            "802.1Q-tagged IPv4-in-IPv4 -> tag kept",
            enc(&inner4_q, lb4, be4),
            Expect::exact(XDP_PASS, inner4_q.clone(), &[DECAP_V4]),
        ),
        Fixture::new(
            "802.1ad-tagged IPv6-in-IPv6 -> tag kept",
            enc(&inner6_ad, lb6, be6),
            Expect::exact(XDP_PASS, inner6_ad.clone(), &[DECAP_V6]),
        ),
        Fixture::new(
            "outer IPv4 with options (IHL 6) -> all 24 bytes removed",
            enc4_opts,
            Expect::exact(XDP_PASS, inner4.clone(), &[DECAP_V4]),
        ),
        Fixture::new(
            "plain IPv4 TCP -> pass unchanged",
            inner4.clone(),
            Expect::pass(&[DECAP_PASS]),
        ),
        Fixture::new(
            "plain IPv6 UDP -> pass unchanged",
            Flow::udp(CLIENT_V6, 53004, VIP_V6, 53).frame(eth(), TcpFlags::NONE, |b| b),
            Expect::pass(&[DECAP_PASS]),
        ),
        Fixture::new("ARP -> pass unchanged", arp, Expect::pass(&[DECAP_PASS])),
        Fixture::new(
            "truncated Ethernet (10 bytes) -> pass unchanged",
            truncated(inner4.clone(), 14),
            Expect::pass(&[DECAP_PASS]),
        )
        .linear(10),
        Fixture::new(
            "IPv6 with an extension header before next header 41 -> pass unchanged",
            v6_with_ext,
            Expect::pass(&[DECAP_PASS]),
        ),
        Fixture::new(
            "IPv6 in IPv4 (protocol 41) -> pass unchanged",
            ip6_in_ip4,
            Expect::pass(&[DECAP_PASS]),
        ),
        Fixture::new(
            "IPv4 protocol 4 with the inner header cut to 10 bytes -> drop",
            truncated(enc4.clone(), 14 + 20 + 10),
            Expect::drop(&[DECAP_DROP_MALFORMED]),
        ),
        Fixture::new(
            "IPv6 next header 41 with the inner header cut to 20 bytes -> drop",
            truncated(enc6, 14 + 40 + 20),
            Expect::drop(&[DECAP_DROP_MALFORMED]),
        ),
        Fixture::new(
            "IPv4 protocol 4 with IHL 4 -> drop",
            patched(enc4, 14, 0x44),
            Expect::drop(&[DECAP_DROP_MALFORMED]),
        ),
    ]
}

#[test]
fn decap() {
    let fixtures = decap_fixtures();
    let d = Decap::load().unwrap_or_else(|e| panic!("loading xdp_decap failed: {e}"));
    run_group("decap", &mut DecapTarget(d), &fixtures);
}
