//! `pubsub-peer`: a separate process that publishes, subscribes or misbehaves, for the pubsub's
//! integration tests and for `scripts/bench-pubsub.sh`.
//!
//! Every command prints one line per thing a test needs to see, and flushes it, so a test can
//! read the child's stdout as a log of what happened.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use powernode_pubsub::checkpoint::CheckpointDir;
use powernode_pubsub::frame::{Frame, Hello, MAX_FRAME, PROTOCOL_VERSION};
use powernode_pubsub::testing::{monotonic_ns, PersistentTestItem, TestItem};
use powernode_pubsub::{Dirs, Event, Publication, Subscription};
use powernode_types::Topic;
use powernode_types::{AgentState, AgentStatus};
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};

const USAGE: &str = "usage: pubsub-peer COMMAND [--flag value]...
commands:
  publish   --root R --agent A [--keys N] [--size B] [--persistent] [--clear] [--restarted] [--health]
            publish N items (k0..); print 'reloaded X quarantined Y', a 'quarantined KEY
            REASON' line per bad checkpoint, 'published N generation G'; serve until killed
  burst     --root R --agent A [--keys N]   publish forever, cycling over N keys; prints 'bursting'
  subscribe --root R --agent A [--persistent] [--sleep-ms MS]  print every event as a line
  raw-client --socket PATH --send hello|garbage|truncated|oversized|wrong-topic
            connect, send that, print a line per frame received ('hello', 'synchronized',
            'frame'), then 'closed' at EOF or 'timeout' after 10 s of silence
  bench-rtt --dir D [--count N]           raw SOCK_SEQPACKET round trips (the floor)
  bench-latency --root R [--size B] [--count N]   publish->deliver latency to one subscriber
  bench-throughput --root R [--size B] [--count N] [--subscribers K]
  bench-atomic --dir D [--size B] [--count N]     raw atomic writes (temp+fsync+rename+dir fsync)";

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(cmd) = args.next() else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    let flags = Flags::parse(args);
    let result = match cmd.as_str() {
        "publish" => runtime().block_on(publish(&flags)),
        "burst" => runtime().block_on(burst(&flags)),
        "subscribe" => runtime().block_on(subscribe(&flags)),
        "raw-client" => runtime().block_on(raw_client(&flags)),
        "bench-rtt" => bench_rtt(&flags),
        "bench-echo" => bench_echo(&flags),
        "bench-latency" => runtime().block_on(bench_latency(&flags)),
        "bench-throughput" => runtime().block_on(bench_throughput(&flags)),
        "bench-sub" => runtime().block_on(bench_sub(&flags)),
        "bench-atomic" => bench_atomic(&flags),
        _ => {
            eprintln!("unknown command {cmd:?}\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("pubsub-peer {cmd}: {e}");
        std::process::exit(1);
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

/// One thread: the benchmark pins processes to one CPU, and the tests need nothing more.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

struct Flags(HashMap<String, String>);

impl Flags {
    fn parse(args: impl Iterator<Item = String>) -> Self {
        let mut map = HashMap::new();
        let mut args = args.peekable();
        while let Some(a) = args.next() {
            let Some(name) = a.strip_prefix("--") else {
                continue;
            };
            let value = match args.peek() {
                Some(v) if !v.starts_with("--") => args.next().unwrap_or_default(),
                _ => String::from("true"),
            };
            map.insert(name.to_owned(), value);
        }
        Flags(map)
    }
    fn str(&self, name: &str) -> Result<&str, String> {
        self.0
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| format!("--{name} is required"))
    }
    fn num(&self, name: &str, default: u64) -> Result<u64, String> {
        self.0.get(name).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| format!("--{name}: not a number: {v}"))
        })
    }
    fn on(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
    fn dirs(&self) -> Result<Dirs, String> {
        Ok(Dirs::under_root(self.str("root")?))
    }
}

fn say(line: impl AsRef<str>) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{}", line.as_ref());
    let _ = out.flush();
}

fn item(key: String, seq: u64, size: usize) -> TestItem {
    TestItem {
        key,
        seq,
        sent_ns: monotonic_ns(),
        payload: vec![(seq % 251) as u8; size],
    }
}

async fn publish(f: &Flags) -> Res {
    let dirs = f.dirs()?;
    let agent = f.str("agent")?;
    let keys = f.num("keys", 3)?;
    let size = f.num("size", 16)? as usize;
    let persistent = f.on("persistent");
    if f.on("clear") {
        let topic = if persistent {
            PersistentTestItem::NAME
        } else {
            TestItem::NAME
        };
        let _ = std::fs::remove_dir_all(dirs.checkpoints(agent, topic, persistent));
    }
    // Each publication must live until the process is killed: dropping it removes the socket.
    if persistent {
        let p = Publication::<PersistentTestItem>::open(&dirs, agent)?;
        serve_items(&p, f, keys, |i| {
            PersistentTestItem(item(format!("k{i}"), i, size))
        })?;
        serve_until_killed(&dirs, agent, f).await
    } else {
        let p = Publication::<TestItem>::open(&dirs, agent)?;
        serve_items(&p, f, keys, |i| item(format!("k{i}"), i, size))?;
        serve_until_killed(&dirs, agent, f).await
    }
}

/// Serves until killed; with `--health`, also publishes this process's own `AgentStatus`
/// (its real pid, start time and a loop timestamp refreshed every second), as an agent does.
async fn serve_until_killed(dirs: &Dirs, agent: &str, f: &Flags) -> Res {
    if !f.on("health") {
        std::future::pending::<()>().await;
        return Ok(());
    }
    let health = Publication::<AgentStatus>::open(dirs, agent)?;
    let now_ms = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    };
    let mut status = AgentStatus {
        agent: agent.to_owned(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at_ms: now_ms(),
        last_loop_ms: now_ms(),
        state: AgentState::Running,
        last_error: None,
        quarantined_checkpoints: health.status().quarantined.len() as u32,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        status.last_loop_ms = now_ms();
        health.publish(&status)?;
    }
}

/// Publishes k0..k{keys-1} and reports, in this order: what was reloaded from the checkpoints
/// and what was quarantined, then what was published.
fn serve_items<T: Topic>(p: &Publication<T>, f: &Flags, keys: u64, make: impl Fn(u64) -> T) -> Res {
    let reloaded = p.keys().len();
    for i in 0..keys {
        p.publish(&make(i))?;
    }
    if f.on("restarted") {
        p.signal_restarted();
    }
    let q = p.status().quarantined;
    say(format!("reloaded {reloaded} quarantined {}", q.len()));
    for q in q {
        say(format!("quarantined {} {}", q.key, q.reason));
    }
    say(format!("published {keys} generation {}", p.generation()));
    Ok(())
}

async fn burst(f: &Flags) -> Res {
    let p = Publication::<TestItem>::open(&f.dirs()?, f.str("agent")?)?;
    let keys = f.num("keys", 50)?;
    for seq in 0.. {
        p.publish(&item(
            format!("k{}", seq % keys),
            seq,
            64 + (seq % 300) as usize,
        ))?;
        if seq == keys {
            say("bursting");
        }
        if seq % 64 == 0 {
            tokio::task::yield_now().await;
        }
    }
    Ok(())
}

async fn subscribe(f: &Flags) -> Res {
    let dirs = f.dirs()?;
    let agent = f.str("agent")?;
    let sleep = Duration::from_millis(f.num("sleep-ms", 0)?);
    if f.on("persistent") {
        let mut s = Subscription::<PersistentTestItem>::connect(&dirs, agent);
        loop {
            let line = describe(s.next().await, |v: &PersistentTestItem| v.0.seq);
            say(line);
            tokio::time::sleep(sleep).await;
        }
    } else {
        let mut s = Subscription::<TestItem>::connect(&dirs, agent);
        loop {
            let line = describe(s.next().await, |v: &TestItem| v.seq);
            say(line);
            tokio::time::sleep(sleep).await;
        }
    }
}

fn describe<T>(e: Event<T>, seq: impl Fn(&T) -> u64) -> String {
    match e {
        Event::Create { key, value } => format!("create {key} {}", seq(&value)),
        Event::Modify { key, new, .. } => format!("modify {key} {}", seq(&new)),
        Event::Delete { key, .. } => format!("delete {key}"),
        Event::Synchronized => "synchronized".into(),
        Event::Restarted { counter } => format!("restarted {counter}"),
        Event::Disconnected => "disconnected".into(),
    }
}

async fn raw_client(f: &Flags) -> Res {
    let sock = UnixSeqpacket::connect(f.str("socket")?).await?;
    let hello = |topic| {
        Frame::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            topic,
            schema_version: 1,
            persistent: false,
            generation: 0,
        })
        .encode()
    };
    let send: Vec<Vec<u8>> = match f.str("send")? {
        "hello" => vec![hello("TestItem")],
        "wrong-topic" => vec![hello("NotThisTopic")],
        "garbage" => vec![hello("TestItem"), vec![0xff, 0x13, 0x37, 0x00, 0x42]],
        "truncated" => {
            let h = hello("TestItem");
            vec![h[..h.len() / 2].to_vec()]
        }
        "oversized" => vec![hello("TestItem"), vec![0u8; 64 * 1024]],
        other => return Err(format!("unknown --send {other}").into()),
    };
    for frame in &send {
        // The publisher may already have hung up on us; what we print afterwards shows that.
        if sock.send(frame).await.is_err() {
            break;
        }
    }
    let mut buf = vec![0u8; MAX_FRAME + 1];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf)).await {
            Err(_) => {
                say("timeout");
                return Ok(());
            }
            // One message may carry several frames: print one line per frame.
            Ok(Ok(info)) if info.bytes_read() > 0 => {
                for frame in Frame::decode_all(&buf[..info.bytes_read()]) {
                    match frame {
                        Ok(Frame::Hello(_)) => say("hello"),
                        Ok(Frame::Synchronized) => say("synchronized"),
                        Ok(_) => say("frame"),
                        Err(_) => say("garbage"),
                    }
                }
            }
            _ => {
                say("closed");
                return Ok(());
            }
        }
    }
}

// ---- benchmark ------------------------------------------------------------------------------

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(mut us: Vec<f64>) -> String {
    us.sort_by(f64::total_cmp);
    format!(
        "{{\"n\":{},\"p50_us\":{:.2},\"p99_us\":{:.2}}}",
        us.len(),
        percentile(&us, 0.5),
        percentile(&us, 0.99)
    )
}

fn self_exe() -> io::Result<PathBuf> {
    std::env::current_exe()
}

/// Ping-pong of 64-byte messages over a raw blocking `SOCK_SEQPACKET` pair of processes.
fn bench_rtt(f: &Flags) -> Res {
    use nix::sys::socket::{accept, bind, listen, recv, send, Backlog, MsgFlags};
    let count = f.num("count", 20_000)? as usize;
    let path = PathBuf::from(f.str("dir")?).join("rtt.sock");
    let _ = std::fs::remove_file(&path);
    let listener = seqpacket_socket()?;
    bind(
        listener.as_raw_fd(),
        &nix::sys::socket::UnixAddr::new(&path)?,
    )?;
    listen(&listener, Backlog::new(1)?)?;
    let mut child = Command::new(self_exe()?)
        .args(["bench-echo", "--socket"])
        .arg(&path)
        .spawn()?;
    let fd = accept(listener.as_raw_fd())?;
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    let mut rtts = Vec::with_capacity(count);
    for i in 0..count + 1000 {
        let t = Instant::now();
        send(fd, &msg, MsgFlags::empty())?;
        recv(fd, &mut buf, MsgFlags::empty())?;
        if i >= 1000 {
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    nix::unistd::close(fd)?;
    child.wait()?;
    say(summary(rtts));
    Ok(())
}

fn seqpacket_socket() -> nix::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

fn bench_echo(f: &Flags) -> Res {
    use nix::sys::socket::{connect, recv, send, MsgFlags, UnixAddr};
    let fd = seqpacket_socket()?;
    connect(fd.as_raw_fd(), &UnixAddr::new(f.str("socket")?)?)?;
    let mut buf = [0u8; 64];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 {
            return Ok(());
        }
        send(fd.as_raw_fd(), &buf[..n], MsgFlags::empty())?;
    }
}

/// Spawns `k` `bench-sub` children and waits until each has synchronized.
async fn spawn_subscribers(
    f: &Flags,
    k: usize,
    expect: u64,
    ack: &mut UnixSeqpacketListener,
) -> Result<(Vec<std::process::Child>, Vec<UnixSeqpacket>), Box<dyn std::error::Error>> {
    let mut children = Vec::new();
    let mut socks = Vec::new();
    let ack_path = PathBuf::from(f.str("root")?).join("ack.sock");
    for _ in 0..k {
        children.push(
            Command::new(self_exe()?)
                .args([
                    "bench-sub",
                    "--root",
                    f.str("root")?,
                    "--expect",
                    &expect.to_string(),
                    "--ack",
                ])
                .arg(&ack_path)
                .stdout(Stdio::piped())
                .spawn()?,
        );
        let s = ack.accept().await?;
        let mut b = [0u8; 8];
        s.recv(&mut b).await?; // "synchronized"
        socks.push(s);
    }
    Ok((children, socks))
}

/// One publisher, one subscriber child; each publish waits for the child's ack so nothing queues.
async fn bench_latency(f: &Flags) -> Res {
    let dirs = f.dirs()?;
    let size = f.num("size", 64)? as usize;
    let count = f.num("count", 5_000)?;
    std::fs::create_dir_all(f.str("root")?)?;
    let ack_path = PathBuf::from(f.str("root")?).join("ack.sock");
    let _ = std::fs::remove_file(&ack_path);
    let mut ack = UnixSeqpacketListener::bind(&ack_path)?;
    let publication = Publication::<TestItem>::open(&dirs, "bench")?;
    let (mut children, socks) = spawn_subscribers(f, 1, 0, &mut ack).await?;
    let mut b = [0u8; 8];
    for seq in 0..count + 500 {
        publication.publish(&item("k".into(), seq, size))?;
        socks[0].recv(&mut b).await?;
    }
    drop(socks);
    drop(publication);
    let out = children.remove(0).wait_with_output()?;
    say(String::from_utf8_lossy(&out.stdout).trim());
    Ok(())
}

/// Publishes `count` distinct keys as fast as it can; done when every subscriber has them all.
async fn bench_throughput(f: &Flags) -> Res {
    let dirs = f.dirs()?;
    let size = f.num("size", 1024)? as usize;
    let count = f.num("count", 20_000)?;
    let k = f.num("subscribers", 1)? as usize;
    std::fs::create_dir_all(f.str("root")?)?;
    let ack_path = PathBuf::from(f.str("root")?).join("ack.sock");
    let _ = std::fs::remove_file(&ack_path);
    let mut ack = UnixSeqpacketListener::bind(&ack_path)?;
    let publication = Publication::<TestItem>::open(&dirs, "bench")?;
    let (children, socks) = spawn_subscribers(f, k, count, &mut ack).await?;
    let start = Instant::now();
    for seq in 0..count {
        publication.publish(&item(format!("k{seq}"), seq, size))?;
        if seq % 32 == 0 {
            tokio::task::yield_now().await; // let the connection tasks of this one thread send
        }
    }
    let publish_s = start.elapsed().as_secs_f64();
    let mut b = [0u8; 8];
    for s in &socks {
        s.recv(&mut b).await?;
    }
    let total_s = start.elapsed().as_secs_f64();
    drop(socks);
    drop(publication);
    for mut c in children {
        c.wait()?;
    }
    say(format!(
        "{{\"items\":{count},\"subscribers\":{k},\"items_per_s\":{:.0},\"publish_only_per_s\":{:.0}}}",
        count as f64 / total_s,
        count as f64 / publish_s
    ));
    Ok(())
}

/// The subscriber child of the latency and throughput benchmarks.
async fn bench_sub(f: &Flags) -> Res {
    let dirs = f.dirs()?;
    let expect = f.num("expect", 0)?;
    let ack = UnixSeqpacket::connect(f.str("ack")?).await?;
    let mut sub = Subscription::<TestItem>::connect(&dirs, "bench");
    let mut latencies = Vec::new();
    let mut seen = 0u64;
    loop {
        match sub.next().await {
            Event::Synchronized => {
                ack.send(b"sync").await?;
            }
            Event::Create { value, .. } | Event::Modify { new: value, .. } => {
                let now = monotonic_ns();
                if expect == 0 {
                    latencies.push(now.saturating_sub(value.sent_ns) as f64 / 1e3);
                    ack.send(b"ack").await?;
                } else {
                    seen += 1;
                    if seen == expect {
                        ack.send(b"done").await?;
                    }
                }
            }
            Event::Disconnected => break,
            _ => {}
        }
    }
    if expect == 0 {
        // The first 500 are warm-up.
        say(summary(latencies.split_off(latencies.len().min(500))));
    }
    Ok(())
}

/// The floor of a checkpoint write: the same atomic replace, without pubsub around it.
fn bench_atomic(f: &Flags) -> Res {
    let size = f.num("size", 1024)? as usize;
    let count = f.num("count", 20_000)?;
    let (dir, _) = CheckpointDir::open(PathBuf::from(f.str("dir")?).join("atomic"))?;
    let payload = vec![5u8; size];
    let start = Instant::now();
    for i in 0..count {
        dir.write(&format!("k{i}"), &payload)?;
    }
    say(format!(
        "{{\"writes\":{count},\"writes_per_s\":{:.0}}}",
        count as f64 / start.elapsed().as_secs_f64()
    ));
    Ok(())
}
