//! Zero-copy relaying between two plain TCP sockets: `splice(2)` moves the received pages
//! from one socket into a pipe and from the pipe into the other socket, so the bytes never
//! visit user space (the buffered copy costs two memcpys per byte, which is most of a
//! bulk transfer's CPU). HAProxy does the same with `option splice-*`.
//!
//! The pipes come from a small pool ([`super::pipes`]); a connection that finds none
//! left uses the buffered copy.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use nix::fcntl::{SpliceFFlags, splice};
use nix::sys::socket::{MsgFlags, recv, send};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::low_water::{self, LowWater};
use super::pipes::{Lent, Pipe, Pipes};
use super::pump::Meter;

/// The most one splice call moves: the default pipe capacity.
const CHUNK: usize = 64 * 1024;

/// Relays both ways until both directions reached EOF (each EOF is passed on as a
/// half-close) or one failed. Counts bytes from and to `client` in `meter`.
pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    pipes: Pipes,
    meter: &Meter<'_>,
    bulk_batching: bool,
) -> io::Result<()> {
    let Pipes(mut up, mut down) = pipes;
    let ended = AtomicBool::new(false);
    let to_upstream = one_way(
        (client, upstream),
        &mut up,
        LowWater::new(bulk_batching),
        &ended,
        (|n| meter.read(n), || meter.totals().1),
    );
    let to_client = one_way(
        (upstream, client),
        &mut down,
        LowWater::new(bulk_batching),
        &ended,
        (|n| meter.wrote(n), || meter.totals().0),
    );
    tokio::try_join!(to_upstream, to_client).map(|_| ())
}

/// `src` → `dst` until EOF on `src`, then shuts down writing on `dst` — unless the other
/// direction has already ended (`ended`): then both sockets are about to be closed,
/// which sends the FIN anyway, and the shutdown would be a wasted syscall. `moved` counts
/// the bytes this way; `heard` tells the bytes moved the other way so far.
///
/// Small reads go by `recv` into a per-thread scratch buffer and `send` ([`relay_small`]):
/// for a request or a short answer that costs the kernel less than two splices through a
/// pipe, and a short read tells that the socket is drained, so the next read waits for
/// readiness instead of ending in EAGAIN. A read that fills the scratch buffer marks a
/// bulk transfer: from then on the direction splices (`src` → pipe → `dst`), `dst` holds
/// little unsent ([`low_water::limit_unsent`]), and with `bulk_batching` a sustained
/// stream wakes the thread per batch ([`LowWater`]).
async fn one_way(
    (src, dst): (&TcpStream, &TcpStream),
    lent: &mut Lent,
    mut mark: LowWater,
    ended: &AtomicBool,
    (moved, heard): (impl Fn(u64), impl Fn() -> u64),
) -> io::Result<()> {
    let Some(pipe) = lent.pipe.as_ref() else {
        return Err(io::Error::other("pipe already returned"));
    };
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut bulk = false;
    loop {
        // Fill: only when the pipe is empty, so a full pipe never blocks the socket read.
        mark.readable(src).await?;
        // Whatever enters the pipe is counted in `lent.held` at once, also when the call
        // then fails: a pipe is pooled again only if it holds nothing.
        let read = if bulk {
            src.try_io(Interest::READABLE, || {
                Ok(splice(
                    src.as_fd(),
                    None,
                    pipe.w.as_fd(),
                    None,
                    CHUNK,
                    flags,
                )?)
            })
            .inspect(|&n| lent.held += n)
        } else {
            relay_small(src, dst, pipe, &mut lent.held, &moved)
        };
        let n = match read {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        crate::busy_poll::mark();
        if n == 0 {
            // EOF: pass the half-close on (the other direction may still be streaming).
            if !ended.swap(true, Ordering::Relaxed) {
                let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
            }
            return Ok(());
        }
        if bulk {
            mark.spliced(src, n, &heard);
        } else if n == SCRATCH {
            bulk = true;
            low_water::limit_unsent(dst);
        }
        // Drain.
        while lent.held > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                Ok(splice(
                    pipe.r.as_fd(),
                    None,
                    dst.as_fd(),
                    None,
                    lent.held,
                    flags,
                )?)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => {
                    lent.held -= m;
                    moved(m as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Bytes a direction reads by `recv` before it turns to splicing.
pub(super) const SCRATCH: usize = 16 * 1024;

thread_local! {
    /// Holds bytes only within one [`relay_small`] call (no await in between).
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// Reads what `src` holds (at most [`SCRATCH`] bytes) and sends it to `dst`; what `dst`
/// does not take at once goes into the (empty) pipe, for the caller to drain by splice,
/// and is added to `held`. Returns the bytes read; 0 is EOF.
fn relay_small(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    held: &mut usize,
    moved: &impl Fn(u64),
) -> io::Result<usize> {
    SCRATCH_BUF.with_borrow_mut(|buf| {
        let mut n = 0;
        let read = src.try_io(Interest::READABLE, || {
            n = recv(src.as_raw_fd(), buf, MsgFlags::empty())?;
            // A short read emptied the socket: reporting WouldBlock makes tokio clear
            // the readiness (as its own reads do), unless an event came in meanwhile.
            // A pending EOF stays flagged (tokio keeps the closed state).
            if n > 0 && n < buf.len() {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(())
            }
        });
        match read {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && n > 0 => {}
            Err(e) => return Err(e),
        }
        // The peer's FIN already seen (a short read leaves tokio's closed flag): the next
        // read is EOF and the caller then shuts `dst` down. MSG_MORE holds these bytes
        // back until that shutdown, so they leave with the FIN in one segment, as HAProxy
        // sends them, instead of a data segment, its ACK and a bare FIN.
        let flags = if n < buf.len() && eof_pending(src) {
            MsgFlags::from_bits_retain(libc::MSG_MORE)
        } else {
            MsgFlags::empty()
        };
        let mut sent = 0;
        while sent < n {
            let chunk = &buf[sent..n];
            match dst.try_io(Interest::WRITABLE, || {
                Ok(send(dst.as_raw_fd(), chunk, flags)?)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => {
                    sent += m;
                    moved(m as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        // The pipe is empty and holds at least SCRATCH bytes (see `Pipe::take`): the rest
        // fits at once.
        let mut parked = 0;
        while sent + parked < n {
            match nix::unistd::write(&pipe.w, &buf[sent + parked..n]) {
                Ok(m) if m > 0 => {
                    parked += m;
                    *held += m;
                }
                r => {
                    let why = r.map_or_else(|e| e.to_string(), |_| "pipe full".into());
                    return Err(io::Error::other(format!(
                        "cannot park bytes in a pipe: {why}"
                    )));
                }
            }
        }
        Ok(n)
    })
}

/// Whether epoll has reported `src`'s read side closed (the peer's FIN, or a reset),
/// from tokio's cached readiness: no syscall.
fn eof_pending(src: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    matches!(
        pin!(src.ready(Interest::READABLE)).poll(&mut cx),
        Poll::Ready(Ok(r)) if r.is_read_closed()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::segs_in;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Runs `work` beside a relay that must outlive it (the connection stays open), within
    /// a deadline; `what` names what `work` waits for.
    async fn beside<T>(
        relay: impl Future<Output = io::Result<()>>,
        work: impl Future<Output = T>,
        what: &str,
    ) -> T {
        tokio::select! {
            r = relay => panic!("the relay ended early: {r:?}"),
            r = tokio::time::timeout(std::time::Duration::from_secs(20), work) => {
                r.unwrap_or_else(|_| panic!("{what} never arrived"))
            }
        }
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// A relay's surroundings: (client, client side, upstream side, backend, pipes); the
    /// client is connected to the client side, the upstream side to the backend.
    async fn rig() -> (TcpStream, TcpStream, TcpStream, TcpStream, Pipes) {
        let (client, client_side) = pair().await;
        let (upstream_side, backend) = pair().await;
        let pipes = Pipes::take().expect("pipes");
        (client, client_side, upstream_side, backend, pipes)
    }

    /// 4 MiB each way through the relay, with half-closes, byte-exact and counted.
    #[tokio::test]
    async fn relays_both_ways_with_half_close_and_counts() {
        let (mut client, client_side, upstream_side, mut backend, pipes) = rig().await;
        let meter = Meter::detached();
        let data: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
        // Like the listener, the relay's owner closes both sockets once it returns (the
        // last EOF is passed on by that close, not by a shutdown).
        let relay = async {
            let r = relay(&client_side, &upstream_side, pipes, &meter, false).await;
            drop((client_side, upstream_side));
            r
        };
        let d = data.clone();
        let client_io = async move {
            let (mut r, mut w) = client.split();
            let send = async {
                w.write_all(&d).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let recv = r.read_to_end(&mut got);
            let (_, n) = tokio::join!(send, recv);
            n.unwrap();
            got
        };
        let backend_io = async move {
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap();
            backend.write_all(&got).await.unwrap();
            backend.shutdown().await.unwrap();
            got
        };
        let (r, echoed, at_backend) = tokio::join!(relay, client_io, backend_io);
        r.unwrap();
        assert!(at_backend == data, "backend got other bytes");
        assert!(echoed == data, "client got other bytes");
        assert_eq!(meter.totals(), (data.len() as u64, data.len() as u64));
    }

    /// Request/answer rounds smaller than the scratch buffer (the `recv`/`send` path),
    /// through sockets with the smallest buffers: `send` takes part of a message,
    /// the rest waits in the pipe and is spliced out. Byte-exact, counted, and the EOFs
    /// still end the relay.
    #[tokio::test]
    async fn relays_small_messages_through_small_send_buffers() {
        let (mut client, client_side) = pair().await;
        // The backend's small receive window fills the relay's small send buffer.
        let l = tokio::net::TcpSocket::new_v4().unwrap();
        l.set_recv_buffer_size(1).unwrap();
        l.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l = l.listen(4).unwrap();
        let upstream_side = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut backend, _) = l.accept().await.unwrap();
        for s in [&client_side, &upstream_side] {
            socket2::SockRef::from(s).set_send_buffer_size(1).unwrap();
        }
        let meter = Meter::detached();
        let pipes = Pipes::take().expect("pipes");
        let relay = async {
            let r = relay(&client_side, &upstream_side, pipes, &meter, false).await;
            drop((client_side, upstream_side));
            r
        };
        const ROUNDS: usize = 20;
        const SIZE: usize = 12 * 1024;
        let message =
            |i: usize| -> Vec<u8> { (0..SIZE).map(|j| ((i * 7 + j) % 251) as u8).collect() };
        let client_io = async move {
            for i in 0..ROUNDS {
                client.write_all(&message(i)).await.unwrap();
                let mut answer = vec![0; SIZE];
                client.read_exact(&mut answer).await.unwrap();
                assert!(answer == message(i), "round {i}: the answer differs");
            }
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        };
        let backend_io = async move {
            let mut buf = vec![0; SIZE];
            for i in 0..ROUNDS {
                backend.read_exact(&mut buf).await.unwrap();
                assert!(buf == message(i), "round {i}: the request differs");
                backend.write_all(&buf).await.unwrap();
            }
            let mut rest = Vec::new();
            backend.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            backend.shutdown().await.unwrap();
        };
        let (r, (), ()) = tokio::join!(relay, client_io, backend_io);
        r.unwrap();
        let n = (ROUNDS * SIZE) as u64;
        assert_eq!(meter.totals(), (n, n));
    }

    /// A bulk direction keeps little unsent in its destination; a direction that only
    /// carried small messages leaves its destination as the kernel made it.
    #[tokio::test]
    async fn a_bulk_direction_limits_what_its_destination_holds_unsent() {
        use super::super::low_water::tests::unsent_of;
        let (mut client, client_side, upstream_side, mut backend, pipes) = rig().await;
        let meter = Meter::detached();
        const BULK: usize = 1 << 20;
        let relay = relay(&client_side, &upstream_side, pipes, &meter, false);
        let backend_io = async move {
            let mut request = [0; 4];
            backend.read_exact(&mut request).await.unwrap();
            backend.write_all(&vec![3; BULK]).await.unwrap();
            backend
        };
        let client_io = async {
            client.write_all(b"give").await.unwrap();
            let mut answer = vec![0; BULK];
            client.read_exact(&mut answer).await.unwrap();
        };
        beside(
            relay,
            async { tokio::join!(backend_io, client_io) },
            "the answer",
        )
        .await;
        assert_eq!(
            unsent_of(&client_side),
            16 * 1024,
            "the bulk direction's destination"
        );
        assert_eq!(unsent_of(&upstream_side), 0, "the request's destination");
    }

    /// `bulk_batching`: a sustained stream raises the mark on the upstream socket, and
    /// bytes left below it when the sender pauses (no FIN) still go on, after which the
    /// mark is down again.
    #[tokio::test]
    async fn a_batched_stream_raises_the_mark_and_its_tail_still_arrives() {
        use super::super::low_water::tests::mark_of;
        let (mut client, client_side, upstream_side, mut backend, pipes) = rig().await;
        let meter = Meter::detached();
        const BULK: usize = 8 << 20;
        const TAIL: usize = 1000;
        // A fixed receive buffer (no autotuning to wait for): room for the largest mark.
        socket2::SockRef::from(&upstream_side)
            .set_recv_buffer_size(1 << 20)
            .unwrap();
        let (bulk_read, bulk_seen) = tokio::sync::oneshot::channel::<()>();
        // The sockets outlive the relay: the client side checks the upstream's mark.
        let relay = relay(&client_side, &upstream_side, pipes, &meter, true);
        let backend_io = async move {
            backend.write_all(&vec![7; BULK]).await.unwrap();
            // The tail goes only once the bulk has been read: it arrives alone, below
            // any mark, and the connection stays open.
            bulk_seen.await.unwrap();
            backend.write_all(&[9; TAIL]).await.unwrap();
            backend
        };
        let client_io = async {
            let mut got = 0;
            let mut highest = 0;
            let mut buf = vec![0; 64 * 1024];
            while got < BULK {
                got += client.read(&mut buf).await.unwrap();
                highest = highest.max(mark_of(&upstream_side));
            }
            assert_eq!(got, BULK, "bytes of the tail came with the bulk");
            bulk_read.send(()).unwrap();
            let mut tail = vec![0; TAIL];
            client.read_exact(&mut tail).await.unwrap();
            assert!(tail.iter().all(|&b| b == 9));
            (highest, mark_of(&upstream_side), client)
        };
        let streamed = async { tokio::join!(backend_io, client_io) };
        let (_backend, (highest, after, _client)) = beside(relay, streamed, "the tail").await;
        assert!(highest > 1, "the mark was never raised");
        assert_eq!(after, 1, "the mark stayed up after the sender paused");
    }

    /// `bulk_batching` on a kept-alive request/answer connection: answers that together
    /// pass the sustained count, each after a request, never raise the mark (so their
    /// tails never wait for the stall deadline).
    #[tokio::test]
    async fn answers_after_requests_never_raise_the_mark() {
        use super::super::low_water::tests::mark_of;
        let (mut client, client_side, upstream_side, mut backend, pipes) = rig().await;
        let meter = Meter::detached();
        const ANSWER: usize = 512 * 1024;
        const ROUNDS: usize = 8;
        // As above: a buffer that leaves room for a mark, were one raised.
        socket2::SockRef::from(&upstream_side)
            .set_recv_buffer_size(1 << 20)
            .unwrap();
        let relay = relay(&client_side, &upstream_side, pipes, &meter, true);
        let backend_io = async move {
            let mut request = [0; 4];
            for _ in 0..ROUNDS {
                backend.read_exact(&mut request).await.unwrap();
                backend.write_all(&vec![5; ANSWER]).await.unwrap();
            }
            backend
        };
        let client_io = async {
            let mut highest = 0;
            let mut answer = vec![0; ANSWER];
            for _ in 0..ROUNDS {
                client.write_all(b"next").await.unwrap();
                client.read_exact(&mut answer).await.unwrap();
                highest = highest.max(mark_of(&upstream_side));
            }
            highest
        };
        let streamed = async { tokio::join!(backend_io, client_io) };
        let (_backend, highest) = beside(relay, streamed, "the answers").await;
        assert_eq!(
            highest, 1,
            "a mark was raised on a request/answer connection"
        );
    }

    /// An upstream that answers and closes (HTTP/1.0, `Connection: close`): when its FIN is
    /// known by the time the answer is read, the answer and the FIN reach the client in
    /// one segment, not a data segment followed by a bare FIN.
    #[tokio::test]
    async fn an_answer_and_the_upstream_eof_leave_in_one_segment() {
        let (mut client, client_side) = pair().await;
        let (upstream_side, mut backend) = pair().await;
        backend.write_all(b"the answer").await.unwrap();
        backend.shutdown().await.unwrap();
        // Precondition: the FIN has arrived and epoll has told tokio.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !eof_pending(&upstream_side) {
            assert!(
                std::time::Instant::now() < deadline,
                "the upstream FIN never showed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let segs_before = segs_in(&client);
        let meter = Meter::detached();
        let pipes = Pipes::take().expect("pipes");
        let relay = async {
            let r = relay(&client_side, &upstream_side, pipes, &meter, false).await;
            drop((client_side, upstream_side));
            r
        };
        let client_io = async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            let segs = segs_in(&client) - segs_before;
            client.shutdown().await.unwrap();
            (got, segs)
        };
        let (r, (got, segs)) = tokio::join!(relay, client_io);
        r.unwrap();
        assert_eq!(got, b"the answer");
        assert_eq!(segs, 1, "the answer and the FIN came in {segs} segments");
    }
}
