//! A TCP proxy on loopback that can be cut: it forwards each connection to
//! its target (a NATS node) until [`CutProxy::cut`] closes every connection
//! and refuses new ones (its port is closed), and [`CutProxy::restore`]
//! opens the same port again. With it a test cuts one process off from a
//! server while the others still reach it. Threads and the standard library
//! only: a thread accepts, two threads per connection copy the bytes.

use std::collections::HashMap;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Forwarding,
    Cut,
    Ended,
}

struct State {
    mode: Mode,
    /// Whether the port is open (the acceptor has its listener).
    listening: bool,
    /// Both ends of each open connection, to close them on a cut.
    open: HashMap<u64, (TcpStream, TcpStream)>,
    next_id: u64,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `done` holds of the state.
    fn wait(&self, done: impl Fn(&State) -> bool) {
        let mut st = self.lock();
        while !done(&st) {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A cuttable proxy from `127.0.0.1:port()` to a target address.
pub struct CutProxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl CutProxy {
    /// Starts forwarding a free loopback port to `target` (`host:port`).
    pub fn start(target: &str) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                mode: Mode::Forwarding,
                listening: true,
                open: HashMap::new(),
                next_id: 0,
            }),
            changed: Condvar::new(),
        });
        let target = target.to_string();
        let acceptor = {
            let shared = shared.clone();
            std::thread::spawn(move || accept_loop(listener, port, &target, &shared))
        };
        CutProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`, where clients connect.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Closes every connection and the port: when this returns, a new
    /// connection is refused.
    pub fn cut(&self) {
        self.set_mode(Mode::Cut);
    }

    /// Opens the port again and forwards new connections.
    pub fn restore(&self) {
        self.set_mode(Mode::Forwarding);
        self.shared.wait(|st| st.listening);
    }

    fn set_mode(&self, mode: Mode) {
        let open = {
            let mut st = self.shared.lock();
            st.mode = mode;
            self.shared.changed.notify_all();
            if mode == Mode::Forwarding {
                return;
            }
            std::mem::take(&mut st.open)
        };
        for (a, b) in open.values() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
        // The acceptor is blocked in accept(): a connection wakes it to see
        // the new mode and close its listener.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        self.shared.wait(|st| !st.listening);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.set_mode(Mode::Ended);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}

/// Accepts and forwards while forwarding; closes the port while cut, and
/// binds it again when forwarding resumes.
fn accept_loop(mut listener: TcpListener, port: u16, target: &str, shared: &Arc<Shared>) {
    loop {
        for incoming in listener.incoming() {
            if shared.lock().mode != Mode::Forwarding {
                break;
            }
            if let Ok(client) = incoming {
                forward(client, target, shared);
            }
        }
        drop(listener);
        shared.lock().listening = false;
        shared.changed.notify_all();
        shared.wait(|st| st.mode != Mode::Cut);
        if shared.lock().mode == Mode::Ended {
            return;
        }
        // Rust's listeners set SO_REUSEADDR: the port binds again at once.
        listener = TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("the proxy cannot open port {port} again: {e}"));
        shared.lock().listening = true;
        shared.changed.notify_all();
    }
}

/// Connects `client` to `target` and copies bytes both ways on two threads,
/// registered so that a cut closes both ends.
fn forward(client: TcpStream, target: &str, shared: &Arc<Shared>) {
    let Ok(server) = TcpStream::connect(target) else {
        return;
    };
    let id = {
        let mut st = shared.lock();
        if st.mode != Mode::Forwarding {
            return;
        }
        let id = st.next_id;
        st.next_id += 1;
        st.open.insert(
            id,
            (client.try_clone().unwrap(), server.try_clone().unwrap()),
        );
        id
    };
    let pump = |mut from: TcpStream, mut to: TcpStream| {
        let shared = shared.clone();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
            shared.lock().open.remove(&id);
        })
    };
    pump(client.try_clone().unwrap(), server.try_clone().unwrap());
    pump(server, client);
}
