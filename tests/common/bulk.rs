//! Clients for the upstreams' bulk service (port 9000) and small stream helpers.
//!
//! Pattern bytes: byte number k of a stream (from 0) is `k % 251`.
//! Checksum: CRC-32 (IEEE 802.3, the one of zlib.crc32), shown as 8 lower-case hex digits.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const PATTERN_PERIOD: usize = 251;
const CHUNK: usize = PATTERN_PERIOD * 1024;

/// One chunk of pattern plus one period, so any offset has a full chunk after it.
fn pattern_buf() -> &'static [u8] {
    static BUF: OnceLock<Vec<u8>> = OnceLock::new();
    BUF.get_or_init(|| {
        (0..CHUNK + PATTERN_PERIOD)
            .map(|i| (i % PATTERN_PERIOD) as u8)
            .collect()
    })
}

/// `len` pattern bytes starting at stream offset `offset`.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let buf = pattern_buf();
    let mut off = (offset % PATTERN_PERIOD as u64) as usize;
    while v.len() < len {
        let take = (len - v.len()).min(CHUNK);
        v.extend_from_slice(&buf[off..off + take]);
        off = (off + take) % PATTERN_PERIOD;
    }
    v
}

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut j = 1;
        while j < 8 {
            t[j][i] = (t[j - 1][i] >> 8) ^ t[0][(t[j - 1][i] & 0xff) as usize];
            j += 1;
        }
        i += 1;
    }
    t
}

static CRC: [[u32; 256]; 8] = crc_tables();

/// Continues a CRC-32 (start with 0), like `zlib.crc32(data, crc)`.
pub fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    let mut chunks = data.chunks_exact(8);
    for b in &mut chunks {
        let lo = c ^ u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let hi = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        c = CRC[7][(lo & 0xff) as usize]
            ^ CRC[6][((lo >> 8) & 0xff) as usize]
            ^ CRC[5][((lo >> 16) & 0xff) as usize]
            ^ CRC[4][(lo >> 24) as usize]
            ^ CRC[3][(hi & 0xff) as usize]
            ^ CRC[2][((hi >> 8) & 0xff) as usize]
            ^ CRC[1][((hi >> 16) & 0xff) as usize]
            ^ CRC[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        c = CRC[0][((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

pub fn crc32(data: &[u8]) -> u32 {
    crc32_update(0, data)
}

/// CRC-32 of the first `n` pattern bytes (memoised per n).
pub fn pattern_crc32(n: u64) -> u32 {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static MEMO: OnceLock<Mutex<HashMap<u64, u32>>> = OnceLock::new();
    let memo = MEMO.get_or_init(Default::default);
    if let Some(c) = memo.lock().unwrap().get(&n) {
        return *c;
    }
    let buf = pattern_buf();
    let (mut crc, mut left, mut off) = (0u32, n, 0usize);
    while left > 0 {
        let take = left.min(CHUNK as u64) as usize;
        crc = crc32_update(crc, &buf[off..off + take]);
        off = (off + take) % PATTERN_PERIOD;
        left -= take as u64;
    }
    memo.lock().unwrap().insert(n, crc);
    crc
}

/// Writes `n` pattern bytes (stream offsets 0..n) to `w`.
pub fn write_pattern<W: Write>(w: &mut W, n: u64) -> io::Result<()> {
    let buf = pattern_buf();
    let (mut left, mut off) = (n, 0usize);
    while left > 0 {
        let take = left.min(CHUNK as u64) as usize;
        w.write_all(&buf[off..off + take])?;
        off = (off + take) % PATTERN_PERIOD;
        left -= take as u64;
    }
    Ok(())
}

/// Reads until EOF, checking that the bytes are the pattern; returns how many arrived.
/// Errors (InvalidData) at the first wrong byte.
pub fn read_pattern<R: Read>(r: &mut R) -> io::Result<u64> {
    let pat = pattern_buf();
    let mut buf = vec![0u8; 1 << 20];
    let mut got: u64 = 0;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut done = 0;
        while done < k {
            let off = ((got + done as u64) % PATTERN_PERIOD as u64) as usize;
            let take = (k - done).min(CHUNK);
            if buf[done..done + take] != pat[off..off + take] {
                let bad = (0..take)
                    .find(|&i| buf[done + i] != pat[off + i])
                    .unwrap_or(0);
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("pattern mismatch at byte {}", got + (done + bad) as u64),
                ));
            }
            done += take;
        }
        got += k as u64;
    }
}

/// Asks the bulk service (port 9000) for `n` bytes (`SEND n`), checks them and
/// that exactly n arrive before EOF.
pub fn bulk_download(s: &mut TcpStream, n: u64) -> io::Result<()> {
    s.write_all(format!("SEND {n}\n").as_bytes())?;
    let got = read_pattern(s)?;
    let _ = s.shutdown(Shutdown::Write);
    if got != n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("bulk download: wanted {n} bytes, got {got}"),
        ));
    }
    Ok(())
}

/// Sends `n` pattern bytes to the bulk service (`RECV n`) and checks its
/// answer `OK n <crc32>`.
pub fn bulk_upload(s: &mut TcpStream, n: u64) -> io::Result<()> {
    s.write_all(format!("RECV {n}\n").as_bytes())?;
    write_pattern(s, n)?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    let want = format!("OK {n} {:08x}\n", pattern_crc32(n));
    if reply != want {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bulk upload: wanted {want:?}, got {reply:?}"),
        ));
    }
    Ok(())
}

/// Reads until EOF or `timeout` (then whatever arrived, with the error).
pub fn read_to_end_timeout(s: &mut TcpStream, timeout: Duration) -> (Vec<u8>, io::Result<()>) {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (out, Err(io::ErrorKind::TimedOut.into()));
        }
        if let Err(e) = s.set_read_timeout(Some(left)) {
            return (out, Err(e));
        }
        match s.read(&mut buf) {
            Ok(0) => return (out, Ok(())),
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (out, Err(e)),
        }
    }
}

/// Reads one line (through `\n`) byte by byte, so nothing after it is consumed.
pub fn read_line(s: &mut TcpStream, timeout: Duration) -> io::Result<String> {
    s.set_read_timeout(Some(timeout))?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => break,
            _ => {
                line.push(b[0]);
                if b[0] == b'\n' {
                    break;
                }
            }
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}
