//! The watchdog: a heartbeat over a side TCP channel, so that a rank that dies or cannot be
//! reached ends the run on every rank within seconds, with its name.
//!
//! In: the hostfile, this rank, a deadline for the ring to form. Out: threads that end the
//! process (exit 1) with a message naming the rank that failed. Invariant: MLX's ring receive
//! waits with no timeout (ring.cpp), so nothing on the main thread can notice a dead peer; this
//! channel does, apart from the ring: rank 0 accepts one connection from every other rank;
//! each side writes a byte every [`BEAT`]; silence for the timeout, or a closed connection,
//! is a failure of that peer unless it said it was done. Rank 0 tells the others which rank
//! failed before it exits.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Hostfile, PipelineError};

/// How often each side writes.
const BEAT: Duration = Duration::from_millis(500);

const HEARTBEAT: u8 = b'H';
const DONE: u8 = b'D';
const FAILED: u8 = b'F';

/// The watchdog of one rank.
pub struct Watch {
    inner: Arc<Inner>,
}

struct Inner {
    rank: usize,
    /// Each rank's first ring address, for messages.
    names: Vec<SocketAddr>,
    /// Failures end the process while armed.
    armed: AtomicBool,
    /// The ring formed (the set-up deadline no longer applies).
    formed: AtomicBool,
    /// The connections to peers (rank 0: every other rank; the others: rank 0), for writing.
    peers: Mutex<Vec<(usize, TcpStream)>>,
}

/// Silence after which a peer counts as gone (`FLASHPACK_HEARTBEAT_TIMEOUT_MS`, 5 s by
/// default: ten beats, room for a loaded machine).
fn silence() -> Duration {
    Duration::from_millis(crate::env::number("FLASHPACK_HEARTBEAT_TIMEOUT_MS").unwrap_or(5000))
}

impl Watch {
    /// Starts the side channel (rank 0 listens on [`Hostfile::control_addr`], the others
    /// connect to it) and the set-up deadline; returns at once.
    pub fn start(
        hostfile: &Hostfile,
        rank: usize,
        connect_timeout: Duration,
    ) -> Result<Watch, PipelineError> {
        let inner = Arc::new(Inner {
            rank,
            names: hostfile.ranks.iter().map(|a| a[0]).collect(),
            armed: AtomicBool::new(true),
            formed: AtomicBool::new(false),
            peers: Mutex::new(Vec::new()),
        });
        let control = hostfile.control_addr();
        let size = hostfile.ranks.len();
        if rank == 0 {
            let listener = TcpListener::bind(control).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("rank 0 cannot listen on {control} for the heartbeat: {e}"),
                )
            })?;
            let i = inner.clone();
            std::thread::spawn(move || accept_peers(&i, listener, size));
        } else {
            let i = inner.clone();
            let deadline = Instant::now() + connect_timeout;
            std::thread::spawn(move || connect_to_root(&i, control, deadline));
        }
        let i = inner.clone();
        std::thread::spawn(move || {
            std::thread::sleep(connect_timeout);
            if !i.formed.load(Ordering::SeqCst) {
                let missing = i.missing(size);
                i.fail_with(&format!(
                    "the pipeline did not form within {} s: no answer from {missing} (check the \
                     hostfile's addresses, that every rank was started with its --rank, and that \
                     the ports are open)",
                    connect_timeout.as_secs()
                ));
            }
        });
        let i = inner.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(BEAT);
            let mut peers = i.peers.lock().unwrap_or_else(|e| e.into_inner());
            for (_, s) in peers.iter_mut() {
                let _ = s.write_all(&[HEARTBEAT]);
            }
        });
        Ok(Watch { inner })
    }

    /// The ring formed: the set-up deadline is over.
    pub fn formed(&self) {
        self.inner.formed.store(true, Ordering::SeqCst);
    }

    /// Stops ending the process on a peer's failure (this rank is ending on its own).
    pub fn disarm(&self) {
        self.inner.armed.store(false, Ordering::SeqCst);
        self.inner.formed.store(true, Ordering::SeqCst);
    }

    /// Tells the peers this rank finished normally (its connection closing is no failure).
    pub fn done(&self) {
        let mut peers = self.inner.peers.lock().unwrap_or_else(|e| e.into_inner());
        for (_, s) in peers.iter_mut() {
            let _ = s.write_all(&[DONE]);
            let _ = s.flush();
        }
    }
}

impl Inner {
    fn name(&self, rank: usize) -> String {
        match self.names.get(rank) {
            Some(a) => format!("rank {rank} ({a})"),
            None => format!("rank {rank}"),
        }
    }

    fn missing(&self, size: usize) -> String {
        if self.rank != 0 {
            return self.name(0);
        }
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let missing: Vec<String> = (1..size)
            .filter(|r| !peers.iter().any(|(p, _)| p == r))
            .map(|r| self.name(r))
            .collect();
        if missing.is_empty() {
            "the ring backend (every rank reached the heartbeat)".into()
        } else {
            missing.join(", ")
        }
    }

    /// A peer failed: rank 0 tells the others which, then this process ends.
    fn peer_failed(&self, rank: usize, why: &str) {
        if !self.armed.load(Ordering::SeqCst) {
            return;
        }
        if self.rank == 0 {
            let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            for (p, s) in peers.iter_mut() {
                if *p != rank {
                    let mut msg = vec![FAILED];
                    msg.extend_from_slice(&(rank as u32).to_le_bytes());
                    let _ = s.write_all(&msg);
                    let _ = s.flush();
                }
            }
        }
        self.fail_with(&format!("pipeline {} {why}", self.name(rank)));
    }

    fn fail_with(&self, msg: &str) {
        if !self.armed.swap(false, Ordering::SeqCst) {
            return;
        }
        eprintln!("error: {msg}; rank {} stops too", self.rank);
        // SAFETY: ends the process at once, without running destructors: MLX's threads may be
        // blocked in a receive from the failed peer, and the process has nothing to flush
        // (stderr is unbuffered; stdout is flushed per piece).
        unsafe { libc::_exit(1) }
    }
}

fn accept_peers(inner: &Arc<Inner>, listener: TcpListener, size: usize) {
    for _ in 1..size {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let mut b = [0u8; 4];
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        if s.read_exact(&mut b).is_err() {
            continue;
        }
        let rank = u32::from_le_bytes(b) as usize;
        watch_peer(inner, rank, s);
    }
}

fn connect_to_root(inner: &Arc<Inner>, control: SocketAddr, deadline: Instant) {
    loop {
        if let Ok(mut s) = TcpStream::connect_timeout(&control, Duration::from_secs(1)) {
            if s.write_all(&(inner.rank as u32).to_le_bytes()).is_ok() {
                watch_peer(inner, 0, s);
                return;
            }
        }
        if Instant::now() >= deadline {
            return; // the set-up deadline names rank 0
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Registers `s` for heartbeats and reads from it on a thread of its own.
fn watch_peer(inner: &Arc<Inner>, rank: usize, s: TcpStream) {
    let _ = s.set_nodelay(true);
    let Ok(writer) = s.try_clone() else {
        return;
    };
    inner
        .peers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((rank, writer));
    let i = inner.clone();
    std::thread::spawn(move || read_peer(&i, rank, s));
}

fn read_peer(inner: &Inner, rank: usize, mut s: TcpStream) {
    let quiet = silence();
    let _ = s.set_read_timeout(Some(quiet));
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(1) if b[0] == HEARTBEAT => {}
            Ok(1) if b[0] == DONE => return,
            Ok(1) if b[0] == FAILED => {
                let mut r = [0u8; 4];
                let failed = match s.read_exact(&mut r) {
                    Ok(()) => u32::from_le_bytes(r) as usize,
                    Err(_) => rank,
                };
                inner.peer_failed(failed, "failed (rank 0 lost it)");
                return;
            }
            Ok(1) => {}
            Ok(_) => {
                inner.peer_failed(rank, "ended: its connection closed");
                return;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                inner.peer_failed(
                    rank,
                    &format!("sent no heartbeat for {:.1} s", quiet.as_secs_f64()),
                );
                return;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                inner.peer_failed(rank, &format!("cannot be reached: {e}"));
                return;
            }
        }
    }
}
