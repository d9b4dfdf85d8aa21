//! A self-contained L2 DSR lab in network namespaces, with real traffic.
//!
//! Topology (all namespaces unique per run):
//!
//! ```text
//!  client ──┐                      switch ns: br0 with one port per host;
//!  lb ──────┤ br0 (switch ns)      the lb's port runs an XDP_PASS program
//!  b1..b3 ──┘                      (`bench_pass`) so XDP_TX frames arrive
//! ```
//!
//! The client's veth has TX checksum offload off (see [`crate::netns`]
//! for why both are needed on veth).
//!
//! One flat L2 subnet: 198.18.0.0/16 and 2001:db8::/64. The client reaches
//! the VIP through a permanent neighbour entry VIP → LB MAC. The LB runs
//! `xdp_lb` on its interface (driver mode if possible), which rewrites the
//! destination MAC to a backend's and sends the frame back out (XDP_TX).
//! Every backend holds the VIP on `lo` (ARP/ND for it suppressed) and
//! serves TCP :80 and UDP :53 from this process, answering with its own
//! name; replies go straight to the client.
//!
//! [`Lab::new`] builds it, [`batch`] with [`tcp_request`] / [`udp_request`]
//! (run inside `lab.client`) sends traffic.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::programs::{Xdp, XdpMode};
use lb_common::{PROG_BENCH_PASS, STAT_NAMES};
use lb_userspace::{
    datapath::{Datapath, DataplaneStats, LoadOptions},
    model::{
        BackendSpec, BackendState, DataplaneSpec, ForwardingMode, HashMode, MacAddr, Protocol,
        VipSpec,
    },
    plan::{self, IdAllocator, MapPlan},
};

use crate::{
    netns::{self, Mac, NetNs, fmt_mac},
    scenario::{SEED, VIP_V4, VIP_V6},
};

fn start_server(ns: &NetNs, i: u8) -> Server {
    Server::start(ns, backend_name(i), &[V4.backend(i), V6.backend(i)])
}

/// Backends in the lab, named `backend-1` ..
pub const N_BACKENDS: u8 = 3;
pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
/// The LB host's own (non-VIP) service.
pub const LB_PORT: u16 = 8000;
/// First client source port of the UDP requests.
pub const UDP_SRC_BASE: u16 = 30000;
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound for one batch of requests.
pub const PHASE_BUDGET: Duration = Duration::from_mins(1);
/// A batch gives up after this many failed requests.
const MAX_FAILURES: usize = 10;
/// Servers stop by themselves after this even if never told to.
const SERVER_LIFETIME: Duration = Duration::from_mins(5);

pub const LB_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const LB_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 1, 1);

pub fn backend_v4(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, i)
}

pub fn backend_v6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 2, u16::from(i))
}

pub fn backend_name(i: u8) -> String {
    format!("backend-{i}")
}

/// Addresses of one family.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    pub v6: bool,
}

impl Family {
    pub fn label(self) -> &'static str {
        if self.v6 { "IPv6" } else { "IPv4" }
    }
    pub fn vip(self) -> IpAddr {
        if self.v6 {
            VIP_V6.into()
        } else {
            VIP_V4.into()
        }
    }
    pub fn lb(self) -> IpAddr {
        if self.v6 { LB_V6.into() } else { LB_V4.into() }
    }
    pub fn client(self) -> IpAddr {
        if self.v6 {
            CLIENT_V6.into()
        } else {
            CLIENT_V4.into()
        }
    }
    pub fn backend(self, i: u8) -> IpAddr {
        if self.v6 {
            backend_v6(i).into()
        } else {
            backend_v4(i).into()
        }
    }
}

pub const V4: Family = Family { v6: false };
pub const V6: Family = Family { v6: true };

// ---------------------------------------------------------------- servers

/// Requests a backend server answered.
#[derive(Clone, Copy, Debug, Default)]
pub struct Served {
    pub tcp: usize,
    pub udp: usize,
}

/// A backend's TCP :80 and UDP :53 server (both families, bound to the
/// VIPs, which live on the backend's `lo`), on a thread of this process.
/// Stopped and joined on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Served>>,
}

impl Server {
    /// Binds TCP :80 and UDP :53 on the VIPs and on `own` (the backend's
    /// own addresses, where health probes go) inside `ns`.
    pub fn start(ns: &NetNs, name: String, own: &[IpAddr]) -> Self {
        // Sockets are created inside the backend namespace and stay there.
        let addrs: Vec<IpAddr> = [IpAddr::V4(VIP_V4), IpAddr::V6(VIP_V6)]
            .into_iter()
            .chain(own.iter().copied())
            .collect();
        let (tcp, udp) = ns.in_netns(|| {
            let bind_err =
                |what: &str, e: std::io::Error| -> ! { panic!("{name}: bind {what}: {e}") };
            let tcp: Vec<TcpListener> = addrs
                .iter()
                .map(|a| TcpListener::bind((*a, TCP_PORT)).unwrap_or_else(|e| bind_err("tcp", e)))
                .collect();
            let udp: Vec<UdpSocket> = addrs
                .iter()
                .map(|a| UdpSocket::bind((*a, UDP_PORT)).unwrap_or_else(|e| bind_err("udp", e)))
                .collect();
            (tcp, udp)
        });
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name(format!("srv-{name}"))
            .spawn(move || serve(&name, &tcp, &udp, &flag))
            .expect("spawning a server thread");
        Self {
            stop,
            handle: Some(handle),
        }
    }

    pub fn stop(mut self) -> Served {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .map(|h| h.join().expect("server thread panicked"))
            .unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve(name: &str, tcp: &[TcpListener], udp: &[UdpSocket], stop: &Arc<AtomicBool>) -> Served {
    let reply = format!("{name}\n");
    let mut served = Served::default();
    for l in tcp {
        l.set_nonblocking(true).expect("nonblocking listener");
    }
    for u in udp {
        u.set_nonblocking(true).expect("nonblocking udp socket");
    }
    let mut fds: Vec<libc::pollfd> = tcp
        .iter()
        .map(AsRawFd::as_raw_fd)
        .chain(udp.iter().map(AsRawFd::as_raw_fd))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let deadline = Instant::now() + SERVER_LIFETIME;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        // SAFETY: fds is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        if n <= 0 {
            continue;
        }
        for l in tcp {
            // Bounded: at most 64 accepts per wake-up.
            for _ in 0..64 {
                match l.accept() {
                    Ok((s, _)) => {
                        if answer_tcp(s, reply.as_bytes(), Some(stop)) {
                            served.tcp += 1;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
        let mut buf = [0u8; 512];
        for u in udp {
            for _ in 0..64 {
                match u.recv_from(&mut buf) {
                    Ok((_, from)) => {
                        if u.send_to(reply.as_bytes(), from).is_ok() {
                            served.udp += 1;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
    }
    served
}

/// Reads one request line (bounded in size and time) and answers with
/// `reply` (the server's name):
/// - `GET ...` (HTTP/1.x): reads the header block, answers `200 OK` with
///   the name as the body, closes;
/// - `HOLD`: a long-lived connection: answers the name to every further
///   line on a thread of its own until the client closes or `stop` is set;
/// - anything else: answers the name, closes.
fn answer_tcp(mut s: TcpStream, reply: &[u8], stop: Option<&Arc<AtomicBool>>) -> bool {
    if s.set_nonblocking(false).is_err() || s.set_read_timeout(Some(IO_TIMEOUT)).is_err() {
        return false;
    }
    let _ = s.set_write_timeout(Some(IO_TIMEOUT));
    let mut buf = [0u8; 1024];
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                got += n;
                let head = &buf[..got];
                let http = head.starts_with(b"GET ");
                if (http && head.windows(4).any(|w| w == b"\r\n\r\n"))
                    || (!http && head.contains(&b'\n'))
                {
                    break;
                }
            }
        }
    }
    if got == 0 {
        return false;
    }
    let head = &buf[..got];
    if head.starts_with(b"GET ") {
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            reply.len()
        );
        return s.write_all(resp.as_bytes()).is_ok() && s.write_all(reply).is_ok();
    }
    if head.starts_with(b"HOLD") {
        let Some(stop) = stop.cloned() else {
            return false;
        };
        let reply = reply.to_vec();
        if s.write_all(&reply).is_err() {
            return false;
        }
        let _ = std::thread::Builder::new()
            .name("srv-hold".into())
            .spawn(move || hold(s, &reply, &stop));
        return true;
    }
    s.write_all(reply).is_ok()
}

/// Serves a long-lived connection: one reply per line received, until EOF,
/// an error, `stop`, or [`SERVER_LIFETIME`].
fn hold(mut s: TcpStream, reply: &[u8], stop: &AtomicBool) {
    let deadline = Instant::now() + SERVER_LIFETIME;
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let lines = buf[..n].split(|&b| b == b'\n').count() - 1;
                for _ in 0..lines {
                    if s.write_all(reply).is_err() {
                        return;
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
    // Stopped: close with a reset so the client notices at once.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a correctly sized linger.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

// ---------------------------------------------------------------- the lab

/// The topology and the servers, without the load balancer's program: a
/// test attaches `xdp_lb` itself ([`Lab`]) or runs `lbd` in [`LabNet::lb`].
/// Fields drop in order: servers, the switch-side pass program, then the
/// namespaces.
pub struct LabNet {
    pub servers: Vec<Option<Server>>,
    /// Holds `bench_pass` on the switch side of the LB's veth.
    _peer_pass: Datapath,
    pub lb_mac: Mac,
    pub backend_macs: Vec<Mac>,
    pub client: NetNs,
    pub lb: NetNs,
    pub backends: Vec<NetNs>,
    pub switch: NetNs,
}

impl LabNet {
    /// Builds the topology (namespace names start with `prefix`) and starts
    /// the servers.
    pub fn build(prefix: &str) -> Self {
        let switch = NetNs::new(&format!("{prefix}-sw"));
        switch.bridge("br0");
        let join = |ns: &NetNs, port: &str| {
            netns::veth(ns, "eth0", &switch, port);
            switch.enslave(port, "br0");
        };

        let client = NetNs::new(&format!("{prefix}-cl"));
        join(&client, "cl0");
        // A veth hands the peer a CHECKSUM_PARTIAL skb (checksum left to
        // "hardware"); XDP_TX turns it into a bare frame and that state is
        // lost, so the backend would see bad TCP/UDP checksums. A real NIC
        // puts complete checksums on the wire: make the client do so too.
        client.ethtool_feature("eth0", "tx-checksumming", false);
        client.addr("eth0", &format!("{CLIENT_V4}/16"));
        client.addr("eth0", &format!("{CLIENT_V6}/64"));

        let lb = NetNs::new(&format!("{prefix}-lb"));
        join(&lb, "lb0");
        lb.addr("eth0", &format!("{LB_V4}/16"));
        lb.addr("eth0", &format!("{LB_V6}/64"));
        let lb_mac = lb.mac("eth0");

        let mut backends = Vec::new();
        let mut backend_macs = Vec::new();
        for i in 1..=N_BACKENDS {
            let b = NetNs::new(&format!("{prefix}-b{i}"));
            join(&b, &format!("b{i}"));
            b.addr("eth0", &format!("{}/16", backend_v4(i)));
            b.addr("eth0", &format!("{}/64", backend_v6(i)));
            // DSR: the VIP is local but never announced.
            b.addr("lo", &format!("{VIP_V4}/32"));
            b.addr("lo", &format!("{VIP_V6}/128"));
            b.sysctl("net.ipv4.conf.all.arp_ignore", "1");
            b.sysctl("net.ipv4.conf.all.arp_announce", "2");
            backend_macs.push(b.mac("eth0"));
            backends.push(b);
        }

        // The client sends VIP traffic to the LB's MAC.
        client.neigh_permanent("eth0", VIP_V4.into(), lb_mac);
        client.neigh_permanent("eth0", VIP_V6.into(), lb_mac);

        let servers = (1..=N_BACKENDS)
            .map(|i| Some(start_server(&backends[usize::from(i - 1)], i)))
            .collect();

        // XDP_TX from the LB's interface lands on its switch-side peer,
        // which must run NAPI to take frames from XDP. GRO on the peer is
        // not enough for XDP_TX here (the frames are counted as sent and
        // never arrive: veth only kicks the peer's NAPI after XDP_TX when
        // the peer has an XDP program), so the peer gets an XDP_PASS
        // program: the object's `bench_pass`, attached in the switch
        // namespace.
        let mut peer_pass = Datapath::load(LoadOptions {
            conn_table_capacity: 16,
            pin_dir: None,
        })
        .unwrap_or_else(|e| panic!("loading the object: {e}"));
        switch.in_netns(|| {
            let prog: &mut Xdp = peer_pass
                .ebpf_mut()
                .program_mut(PROG_BENCH_PASS)
                .unwrap_or_else(|| panic!("{PROG_BENCH_PASS} missing from the object"))
                .try_into()
                .unwrap_or_else(|e| panic!("{PROG_BENCH_PASS}: {e}"));
            prog.load()
                .unwrap_or_else(|e| panic!("loading {PROG_BENCH_PASS}: {e}"));
            prog.attach("lb0", XdpMode::Driver)
                .unwrap_or_else(|e| panic!("attaching {PROG_BENCH_PASS} to lb0: {e}"));
        });
        Self {
            servers,
            _peer_pass: peer_pass,
            lb_mac,
            backend_macs,
            client,
            lb,
            backends,
            switch,
        }
    }

    /// Stops backend `i`'s server (1-based): its connections are reset and
    /// it answers nothing until [`LabNet::start_server`].
    pub fn stop_server(&mut self, i: u8) -> Served {
        self.servers[usize::from(i - 1)]
            .take()
            .map(Server::stop)
            .unwrap_or_default()
    }

    /// (Re)starts backend `i`'s server.
    pub fn start_server(&mut self, i: u8) {
        let idx = usize::from(i - 1);
        if self.servers[idx].is_none() {
            self.servers[idx] = Some(start_server(&self.backends[idx], i));
        }
    }

    pub fn names(&self) -> Vec<String> {
        [&self.switch, &self.client, &self.lb]
            .into_iter()
            .chain(&self.backends)
            .map(|n| n.name().to_owned())
            .collect()
    }

    /// From the client namespace: `n` TCP requests (one connection each,
    /// ephemeral source ports) and `n` UDP requests (source ports
    /// `UDP_SRC_BASE + i`) to the VIP of `fam`.
    pub fn client_batches(&self, fam: Family, n: usize) -> (Batch, Batch) {
        let vip = fam.vip();
        let client = fam.client();
        self.client.in_netns(|| {
            let tcp = batch(n, |_| tcp_request(SocketAddr::new(vip, TCP_PORT)));
            let udp = batch(n, |i| {
                udp_request(
                    SocketAddr::new(client, UDP_SRC_BASE + i as u16),
                    SocketAddr::new(vip, UDP_PORT),
                )
            });
            (tcp, udp)
        })
    }
}

/// The topology with `xdp_lb` attached by this process and a plan applied.
/// Fields drop in order: the data path, then the topology.
pub struct Lab {
    pub dp: Datapath,
    pub plan: MapPlan,
    /// XDP attach mode of `xdp_lb`: "driver" or "skb".
    pub mode: &'static str,
    pub net: LabNet,
}

impl std::ops::Deref for Lab {
    type Target = LabNet;
    fn deref(&self) -> &LabNet {
        &self.net
    }
}

impl std::ops::DerefMut for Lab {
    fn deref_mut(&mut self) -> &mut LabNet {
        &mut self.net
    }
}

impl Lab {
    /// Builds the topology (namespace names start with `prefix`), starts
    /// the servers, loads and attaches `xdp_lb` and applies [`spec`] with
    /// backend `i` (1-based) weighted `weights[i - 1]`.
    pub fn new(prefix: &str, weights: [u32; N_BACKENDS as usize]) -> Self {
        let t0 = Instant::now();
        let net = LabNet::build(prefix);
        let spec = spec(&net.backend_macs, weights);
        let plan = plan::plan(&spec, &IdAllocator::default())
            .unwrap_or_else(|e| panic!("planning the spec: {e}"));
        let (mut dp, mode) = net.lb.in_netns(|| {
            let mut dp = Datapath::load(LoadOptions::default())
                .unwrap_or_else(|e| panic!("loading xdp_lb: {e}"));
            let mode = match dp.attach("eth0", XdpMode::Driver) {
                Ok(()) => "driver",
                Err(e) => {
                    eprintln!("note: driver-mode attach failed ({e}); falling back to skb mode");
                    dp.attach("eth0", XdpMode::Skb)
                        .unwrap_or_else(|e| panic!("attaching xdp_lb in skb mode: {e}"));
                    "skb"
                }
            };
            (dp, mode)
        });
        dp.apply(&plan)
            .unwrap_or_else(|e| panic!("applying the plan: {e}"));
        eprintln!(
            "lab up in {:?}: switch {}, client {}, lb {} (xdp {mode}, mac {}), backends {}",
            t0.elapsed(),
            net.switch.name(),
            net.client.name(),
            net.lb.name(),
            fmt_mac(net.lb_mac),
            net.backends
                .iter()
                .map(NetNs::name)
                .collect::<Vec<_>>()
                .join(" "),
        );
        Self {
            dp,
            plan,
            mode,
            net,
        }
    }

    /// Per-backend counters of one VIP, keyed by backend name.
    pub fn backend_counters(
        &self,
        stats: &DataplaneStats,
        vip: IpAddr,
        port: u16,
        proto: Protocol,
    ) -> BTreeMap<String, (u64, u64)> {
        let mut out = BTreeMap::new();
        for b in self
            .plan
            .backends
            .iter()
            .filter(|b| b.vip.address == vip && b.vip.port == port && b.vip.protocol == proto)
        {
            let i = (1..=N_BACKENDS)
                .find(|&i| V4.backend(i) == b.address || V6.backend(i) == b.address)
                .unwrap_or_else(|| panic!("unknown backend {} in the plan", b.address));
            let c = stats.backends.get(&b.id).copied().unwrap_or_default();
            out.insert(backend_name(i), (c.packets, c.new_flows));
        }
        out
    }

    /// Counters that explain a failure: the program's global and
    /// per-backend counters, and the veths' XDP counters.
    pub fn diagnostics(&self, stats: &DataplaneStats) -> String {
        let global: Vec<String> = STAT_NAMES
            .iter()
            .zip(&stats.global)
            .filter(|(_, v)| **v > 0)
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        let backends: Vec<String> = self
            .plan
            .backends
            .iter()
            .map(|b| {
                let c = stats.backends.get(&b.id).copied().unwrap_or_default();
                format!(
                    "{} {} -> {}: pkts {} new {}",
                    b.vip, b.id, b.address, c.packets, c.new_flows
                )
            })
            .collect();
        let mut s = format!(
            "data path: {}\nper backend:\n  {}\n",
            global.join(" "),
            backends.join("\n  ")
        );
        let _ = writeln!(
            s,
            "lb eth0: {:?}\nswitch lb0: {:?}",
            xdp_counters(&self.lb, "eth0"),
            xdp_counters(&self.switch, "lb0")
        );
        for (i, b) in self.backends.iter().enumerate() {
            let out = b.exec(&[
                "nstat",
                "-az",
                "TcpInCsumErrors",
                "UdpInCsumErrors",
                "Udp6InCsumErrors",
                "IpInAddrErrors",
                "TcpExtTCPReqQFullDrop",
            ]);
            let _ = writeln!(
                s,
                "backend-{} nstat: {}",
                i + 1,
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        s
    }
}

/// An interface's XDP counters (`ethtool -S` of a veth), non-zero ones only.
pub fn xdp_counters(ns: &NetNs, ifname: &str) -> Vec<(String, u64)> {
    ns.ethtool_stats(ifname)
        .into_iter()
        .filter(|(k, v)| k.contains("xdp") && *v > 0)
        .collect()
}

/// DSR VIPs TCP :80 and UDP :53 for both families, each over the three
/// backends (MACs `macs`, weights `weights`, in backend order).
pub fn spec(macs: &[Mac], weights: [u32; N_BACKENDS as usize]) -> DataplaneSpec {
    let vip = |fam: Family, port, protocol| VipSpec {
        address: fam.vip(),
        port,
        protocol,
        mode: ForwardingMode::Dsr,
        hash: HashMode::FiveTuple,
        table_size: lb_common::DEFAULT_RING_SIZE,
        backends: (1..=N_BACKENDS)
            .map(|i| BackendSpec {
                address: fam.backend(i),
                weight: weights[usize::from(i - 1)],
                mac: Some(MacAddr(macs[usize::from(i - 1)])),
                state: BackendState::Active,
            })
            .collect(),
    };
    DataplaneSpec {
        hash_seed: SEED,
        ipip_source_v4: None,
        ipip_source_v6: None,
        generation: 1,
        vips: vec![
            vip(V4, TCP_PORT, Protocol::Tcp),
            vip(V4, UDP_PORT, Protocol::Udp),
            vip(V6, TCP_PORT, Protocol::Tcp),
            vip(V6, UDP_PORT, Protocol::Udp),
        ],
    }
}

// ---------------------------------------------------------------- clients

/// What a batch of requests got back.
#[derive(Debug, Default)]
pub struct Batch {
    /// Replies per backend name.
    pub replies: BTreeMap<String, usize>,
    pub failures: Vec<String>,
    pub src_ports: BTreeSet<u16>,
    pub elapsed: Duration,
}

impl Batch {
    pub fn answered(&self) -> usize {
        self.replies.values().sum()
    }
}

pub fn tcp_request(to: SocketAddr) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&to, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    let port = s
        .local_addr()
        .map_err(|e| format!("local_addr: {e}"))?
        .port();
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.write_all(b"who are you?\n")
        .map_err(|e| format!("port {port}: write: {e}"))?;
    let mut reply = String::new();
    (&mut s)
        .take(256)
        .read_to_string(&mut reply)
        .map_err(|e| format!("port {port}: read: {e}"))?;
    let name = reply.trim().to_owned();
    if name.is_empty() {
        return Err(format!("port {port}: empty reply"));
    }
    Ok((port, name))
}

pub fn udp_request(from: SocketAddr, to: SocketAddr) -> Result<(u16, String), String> {
    let s = UdpSocket::bind(from).map_err(|e| format!("bind {from}: {e}"))?;
    s.connect(to).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.send(b"who are you?")
        .map_err(|e| format!("port {}: send: {e}", from.port()))?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf).map_err(|e| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            format!("port {}: no reply within {IO_TIMEOUT:?}", from.port())
        }
        _ => format!("port {}: recv: {e}", from.port()),
    })?;
    Ok((
        from.port(),
        String::from_utf8_lossy(&buf[..n]).trim().to_owned(),
    ))
}

/// `n` requests one after another (each with its own source port), bounded
/// by [`PHASE_BUDGET`] overall.
pub fn batch(n: usize, mut one: impl FnMut(usize) -> Result<(u16, String), String>) -> Batch {
    let t0 = Instant::now();
    let mut b = Batch::default();
    for i in 0..n {
        if t0.elapsed() > PHASE_BUDGET {
            b.failures
                .push(format!("out of time after {i} of {n} requests"));
            break;
        }
        match one(i) {
            Ok((port, name)) => {
                b.src_ports.insert(port);
                *b.replies.entry(name).or_default() += 1;
            }
            Err(e) => {
                b.failures.push(format!("request {i}: {e}"));
                if b.failures.len() >= MAX_FAILURES {
                    b.failures
                        .push(format!("gave up after {MAX_FAILURES} failures"));
                    break;
                }
            }
        }
    }
    b.elapsed = t0.elapsed();
    b
}

/// The LB host's own TCP service: accepts one connection (bounded wait),
/// answers "lb".
pub fn lb_service(listener: TcpListener) -> JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + IO_TIMEOUT * 3;
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    return if answer_tcp(s, b"lb\n", None) {
                        Ok(())
                    } else {
                        Err("no request".into())
                    };
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        }
    })
}
