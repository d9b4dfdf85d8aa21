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
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::programs::{Xdp, XdpMode};
use lb_common::{PROG_BENCH_PASS, PROG_DECAP, STAT_NAMES};
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
/// VIPs forwarded by IP-in-IP (the backends decapsulate with `xdp_decap`).
pub const VIP_IPIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
pub const VIP_IPIP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x20);
/// Outer source prefixes of IP-in-IP.
pub const IPIP_SOURCE_V4: &str = "198.18.250.0/24";
pub const IPIP_SOURCE_V6: &str = "2001:db8:fa::/96";

/// Client `c` (1-based) of the lab.
pub fn client_v4(c: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, c)
}

pub fn client_v6(c: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 1, u16::from(c))
}

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
    /// The IP-in-IP VIP of this family.
    pub fn vip_ipip(self) -> IpAddr {
        if self.v6 {
            VIP_IPIP_V6.into()
        } else {
            VIP_IPIP_V4.into()
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
        let (tcp, udp) = ns.in_netns(|| bind_all(&name, own));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name(format!("srv-{name}"))
            .spawn(move || serve(&name, &tcp, &udp, &flag, SERVER_LIFETIME))
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

/// Binds TCP :80 and UDP :53 on every VIP (DSR and IP-in-IP, both
/// families) and on `own`, in the calling thread's namespace.
fn bind_all(name: &str, own: &[IpAddr]) -> (Vec<TcpListener>, Vec<UdpSocket>) {
    let addrs: Vec<IpAddr> = [
        IpAddr::V4(VIP_V4),
        IpAddr::V6(VIP_V6),
        IpAddr::V4(VIP_IPIP_V4),
        IpAddr::V6(VIP_IPIP_V6),
    ]
    .into_iter()
    .chain(own.iter().copied())
    .collect();
    let bind_err = |what: &str, e: std::io::Error| -> ! { panic!("{name}: bind {what}: {e}") };
    let tcp = addrs
        .iter()
        .map(|a| TcpListener::bind((*a, TCP_PORT)).unwrap_or_else(|e| bind_err("tcp", e)))
        .collect();
    let udp = addrs
        .iter()
        .map(|a| UdpSocket::bind((*a, UDP_PORT)).unwrap_or_else(|e| bind_err("udp", e)))
        .collect();
    (tcp, udp)
}

/// A backend server as a process of its own (the persistent lab): binds in
/// the current namespace and serves until killed.
pub fn serve_process(name: &str, own: &[IpAddr]) {
    let (tcp, udp) = bind_all(name, own);
    let stop = Arc::new(AtomicBool::new(false));
    serve(name, &tcp, &udp, &stop, Duration::from_hours(10 * 365 * 24));
}

fn serve(
    name: &str,
    tcp: &[TcpListener],
    udp: &[UdpSocket],
    stop: &Arc<AtomicBool>,
    lifetime: Duration,
) -> Served {
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
    let deadline = Instant::now() + lifetime;
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

/// How to build the lab.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Namespace names start with this.
    pub prefix: String,
    /// Exact names (`PREFIX-sw`, `PREFIX-lb`, ...) that outlive this
    /// process (the persistent `cargo xtask lab`), instead of unique
    /// per-process names removed on drop.
    pub persistent: bool,
    /// Client hosts (≥ 1).
    pub clients: u8,
    /// Prepare IP-in-IP: IP-in-IP VIPs on the backends' `lo`, `xdp_decap`
    /// on their interfaces, neighbour entries on the LB for the route
    /// lookups.
    pub ipip: bool,
    /// Run the backend servers as threads of this process (tests) — or not
    /// at all (the persistent lab starts them as processes itself).
    pub thread_servers: bool,
    /// bpffs directory for the helper programs' pinned links (the
    /// switch-side XDP_PASS and the decap programs).
    pub pin_dir: PathBuf,
}

impl LabOptions {
    /// Unique names, one client, DSR only, in-process servers.
    pub fn test(prefix: &str, pins: &Path) -> Self {
        Self {
            prefix: prefix.to_owned(),
            persistent: false,
            clients: 1,
            ipip: false,
            thread_servers: true,
            pin_dir: pins.to_path_buf(),
        }
    }
}

/// The topology and the servers, without the load balancer's program: a
/// test attaches `xdp_lb` itself ([`Lab`]) or runs `lbd` in [`LabNet::lb`].
/// Fields drop in order: servers, the helper programs' pins, then the
/// namespaces.
pub struct LabNet {
    pub servers: Vec<Option<Server>>,
    /// Pins of the helper programs (removed on drop unless persistent).
    pins: Option<crate::pins::PinDir>,
    pub lb_mac: Mac,
    pub backend_macs: Vec<Mac>,
    /// The first client (`clients[0]`).
    pub client: NetNs,
    /// Further clients.
    pub more_clients: Vec<NetNs>,
    pub lb: NetNs,
    pub backends: Vec<NetNs>,
    pub switch: NetNs,
    pub options: LabOptions,
}

/// Loads the object's program `name` in the calling thread's namespace,
/// attaches it to `iface` and pins the link at `pin`, so it stays attached
/// without a process holding it.
fn attach_pinned(name: &'static str, iface: &str, pin: &Path) {
    use aya::programs::links::FdLink;
    let mut ebpf = aya::EbpfLoader::new()
        .map_max_entries(lb_common::MAP_CONN_TABLE, 1)
        .load(lb_userspace::EBPF_OBJECT)
        .unwrap_or_else(|e| panic!("loading the object for {name}: {e}"));
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .unwrap_or_else(|| panic!("{name} missing from the object"))
        .try_into()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    prog.load()
        .unwrap_or_else(|e| panic!("loading {name}: {e}"));
    let id = prog
        .attach(iface, XdpMode::Driver)
        .unwrap_or_else(|e| panic!("attaching {name} to {iface}: {e}"));
    let link = prog
        .take_link(id)
        .unwrap_or_else(|e| panic!("taking the link of {name}: {e}"));
    let fd = FdLink::try_from(link).unwrap_or_else(|e| panic!("{name}: not a BPF link: {e}"));
    fd.pin(pin)
        .unwrap_or_else(|e| panic!("pinning {name}'s link at {}: {e}", pin.display()));
}

impl LabNet {
    /// Builds the default test lab (namespace names start with `prefix`).
    pub fn build(prefix: &str) -> Self {
        let pins = crate::pins::PinDir::new(prefix);
        let opts = LabOptions::test(prefix, pins.path());
        Self::build_with(opts, Some(pins))
    }

    /// Builds the lab described by `opts`. `pins` (if any) is removed when
    /// the lab drops.
    #[allow(clippy::too_many_lines)]
    pub fn build_with(opts: LabOptions, pins: Option<crate::pins::PinDir>) -> Self {
        let mk = |role: &str| {
            let name = format!("{}-{role}", opts.prefix);
            if opts.persistent {
                NetNs::named(&name)
            } else {
                NetNs::new(&name)
            }
        };
        std::fs::create_dir_all(&opts.pin_dir)
            .unwrap_or_else(|e| panic!("creating {}: {e}", opts.pin_dir.display()));
        let switch = mk("sw");
        switch.bridge("br0");
        let join = |ns: &NetNs, port: &str| {
            netns::veth(ns, "eth0", &switch, port);
            switch.enslave(port, "br0");
        };

        let mut clients = Vec::new();
        for c in 1..=opts.clients.max(1) {
            let client = mk(&format!("c{c}"));
            join(&client, &format!("c{c}"));
            // A veth hands the peer a CHECKSUM_PARTIAL skb (checksum left to
            // "hardware"); XDP_TX turns it into a bare frame and that state is
            // lost, so the backend would see bad TCP/UDP checksums. A real NIC
            // puts complete checksums on the wire: make the client do so too.
            client.ethtool_feature("eth0", "tx-checksumming", false);
            client.addr("eth0", &format!("{}/16", client_v4(c)));
            client.addr("eth0", &format!("{}/64", client_v6(c)));
            clients.push(client);
        }

        let lb = mk("lb");
        join(&lb, "lb0");
        lb.addr("eth0", &format!("{LB_V4}/16"));
        lb.addr("eth0", &format!("{LB_V6}/64"));
        let lb_mac = lb.mac("eth0");

        let mut backends = Vec::new();
        let mut backend_macs = Vec::new();
        for i in 1..=N_BACKENDS {
            let b = mk(&format!("b{i}"));
            join(&b, &format!("b{i}"));
            b.addr("eth0", &format!("{}/16", backend_v4(i)));
            b.addr("eth0", &format!("{}/64", backend_v6(i)));
            // The VIPs are local but never announced (DSR and IP-in-IP).
            for vip in [VIP_V4.to_string(), VIP_IPIP_V4.to_string()] {
                b.addr("lo", &format!("{vip}/32"));
            }
            for vip in [VIP_V6.to_string(), VIP_IPIP_V6.to_string()] {
                b.addr("lo", &format!("{vip}/128"));
            }
            b.sysctl("net.ipv4.conf.all.arp_ignore", "1");
            b.sysctl("net.ipv4.conf.all.arp_announce", "2");
            b.sysctl("net.ipv4.conf.all.rp_filter", "0");
            b.sysctl("net.ipv4.conf.eth0.rp_filter", "0");
            backend_macs.push(b.mac("eth0"));
            backends.push(b);
        }

        // The clients send VIP traffic to the LB's MAC.
        for client in &clients {
            for vip in [
                VIP_V4.into(),
                VIP_V6.into(),
                VIP_IPIP_V4.into(),
                VIP_IPIP_V6.into(),
            ] {
                client.neigh_permanent("eth0", vip, lb_mac);
            }
        }

        let servers = (1..=N_BACKENDS)
            .map(|i| {
                opts.thread_servers
                    .then(|| start_server(&backends[usize::from(i - 1)], i))
            })
            .collect();

        // XDP_TX from the LB's interface lands on its switch-side peer,
        // which must run NAPI to take frames from XDP. GRO on the peer is
        // not enough for XDP_TX here (the frames are counted as sent and
        // never arrive: veth only kicks the peer's NAPI after XDP_TX when
        // the peer has an XDP program), so the peer gets an XDP_PASS
        // program: the object's `bench_pass`, attached in the switch
        // namespace with a pinned link.
        let pin_dir = opts.pin_dir.clone();
        switch.in_netns(|| attach_pinned(PROG_BENCH_PASS, "lb0", &pin_dir.join("peer-pass")));
        if opts.ipip {
            for (i, b) in backends.iter().enumerate() {
                let pin = pin_dir.join(format!("decap-b{}", i + 1));
                b.in_netns(|| attach_pinned(PROG_DECAP, "eth0", &pin));
            }
            // IP-in-IP is routed: forwarding on (lbd checks it), and
            // bpf_fib_lookup needs resolved neighbours for the next hops.
            lb.sysctl("net.ipv4.conf.all.forwarding", "1");
            lb.sysctl("net.ipv4.conf.eth0.forwarding", "1");
            lb.sysctl("net.ipv6.conf.all.forwarding", "1");
            lb.sysctl("net.ipv6.conf.eth0.forwarding", "1");
            for (i, mac) in (1..=N_BACKENDS).zip(&backend_macs) {
                lb.neigh_permanent("eth0", V4.backend(i), *mac);
                lb.neigh_permanent("eth0", V6.backend(i), *mac);
            }
        }
        let mut clients = clients.into_iter();
        let client = clients.next().expect("at least one client");
        Self {
            servers,
            pins,
            lb_mac,
            backend_macs,
            client,
            more_clients: clients.collect(),
            lb,
            backends,
            switch,
            options: opts,
        }
    }

    /// Every client namespace, the first one first.
    pub fn clients(&self) -> Vec<&NetNs> {
        std::iter::once(&self.client)
            .chain(&self.more_clients)
            .collect()
    }

    /// `n` TCP requests and `n` UDP exchanges (each its own flow) to `vip`
    /// in family `fam`, split evenly over the clients. Each client's TCP
    /// and UDP source ports are `base`, `base + 1`, ...: the flows, and so
    /// the backends they land on, are the same on every run.
    pub fn traffic(&self, fam: Family, vip: IpAddr, n: usize, base: u16) -> (Batch, Batch) {
        let clients = self.clients();
        let per = n / clients.len();
        let (mut tcp, mut udp) = (Batch::default(), Batch::default());
        for (c, ns) in clients.iter().enumerate() {
            let c = c as u8 + 1;
            let from: IpAddr = if fam.v6 {
                client_v6(c).into()
            } else {
                client_v4(c).into()
            };
            let (t, u) = ns.in_netns(|| {
                (
                    batch(per, |i| {
                        tcp_request_from(
                            SocketAddr::new(from, base + i as u16),
                            SocketAddr::new(vip, TCP_PORT),
                        )
                    }),
                    batch(per, |i| {
                        udp_request(
                            SocketAddr::new(from, base + i as u16),
                            SocketAddr::new(vip, UDP_PORT),
                        )
                    }),
                )
            });
            for (acc, b) in [(&mut tcp, t), (&mut udp, u)] {
                for (k, v) in b.replies {
                    *acc.replies.entry(k).or_default() += v;
                }
                acc.failures.extend(b.failures);
                acc.src_ports.extend(b.src_ports);
                acc.elapsed += b.elapsed;
            }
        }
        (tcp, udp)
    }

    /// Leaves the namespaces (and pins) in place when this drops.
    pub fn keep(&mut self) {
        for ns in [&mut self.switch, &mut self.client, &mut self.lb]
            .into_iter()
            .chain(self.more_clients.iter_mut())
            .chain(self.backends.iter_mut())
        {
            ns.keep();
        }
        if let Some(p) = self.pins.take() {
            std::mem::forget(p);
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
            .chain(&self.more_clients)
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
        ipip_mtu: lb_common::DEFAULT_IPIP_MTU,
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

/// One TCP request from an ephemeral port.
pub fn tcp_request(to: SocketAddr) -> Result<(u16, String), String> {
    let s = TcpStream::connect_timeout(&to, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    exchange(s)
}

/// One TCP request from a fixed source address and port, so that which
/// backend answers is the same on every run (a batch of these is a fixed
/// set of flows, not a random sample).
pub fn tcp_request_from(from: SocketAddr, to: SocketAddr) -> Result<(u16, String), String> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(|e| format!("socket: {e}"))?;
    sock.set_reuse_address(true)
        .map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    sock.bind(&from.into())
        .map_err(|e| format!("bind {from}: {e}"))?;
    sock.connect_timeout(&to.into(), IO_TIMEOUT)
        .map_err(|e| format!("port {}: connect: {e}", from.port()))?;
    exchange(sock.into())
}

/// Sends the question on a connected stream and reads the backend's name.
fn exchange(mut s: TcpStream) -> Result<(u16, String), String> {
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

/// Long-lived TCP connections through VIPs (the servers' `HOLD` mode),
/// each answering every line with its backend's name.
pub struct Held {
    conns: Vec<(TcpStream, std::io::BufReader<TcpStream>, String)>,
}

impl Held {
    /// Opens `n` connections from `client`, spread over `vips` (port 80).
    pub fn open(client: &NetNs, vips: &[IpAddr], n: usize) -> Self {
        use std::io::BufRead as _;
        let conns = client.in_netns(|| {
            (0..n)
                .map(|i| {
                    let vip = vips[i % vips.len()];
                    let mut s =
                        TcpStream::connect_timeout(&SocketAddr::new(vip, TCP_PORT), IO_TIMEOUT)
                            .unwrap_or_else(|e| panic!("held connection {i} to {vip}: {e}"));
                    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
                    s.write_all(b"HOLD\n").expect("HOLD");
                    let mut r = std::io::BufReader::new(s.try_clone().expect("clone"));
                    let mut name = String::new();
                    r.read_line(&mut name).expect("held connection greeting");
                    (s, r, name.trim().to_owned())
                })
                .collect()
        });
        Self { conns }
    }

    /// Every connection still answers, from the same backend; returns the
    /// failures (resets, timeouts, another backend).
    pub fn check(&mut self) -> Vec<String> {
        use std::io::BufRead as _;
        let mut bad = Vec::new();
        for (i, (s, r, name)) in self.conns.iter_mut().enumerate() {
            let mut line = String::new();
            let ok = s.write_all(b"ping\n").is_ok() && r.read_line(&mut line).is_ok_and(|n| n > 0);
            if !ok || line.trim() != name {
                bad.push(format!("held connection {i} to {name}: got {line:?}"));
            }
        }
        bad
    }

    /// Connections per backend name.
    pub fn backends(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (_, _, n) in &self.conns {
            *m.entry(n.clone()).or_default() += 1;
        }
        m
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
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
