//! Explicit proxy, plain HTTP: absolute-form `http://` requests framed by
//! hyper. Each request is decided, logged and counted as one flow; proxy and
//! hop-by-hop headers are removed; every request gets its own upstream
//! connection, so nothing upstream is ever shared between clients (or
//! between requests of one client).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONNECTION, HOST};
use hyper::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::{
    connect_failed, explicit_log, match_entry, upstream_addrs, verdict, Explicit, PrefixedIo,
    Target,
};
use crate::proxy::record::FlowLog;
use crate::registry::{Decision, Protocol, Reason, Verdict};
use crate::state::Shared;
use crate::upstream::{ConnectError, Connected};
use crate::vocab::Mode;

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// Serves one client connection whose first bytes (`prefix`) are already read.
pub async fn serve(
    shared: Arc<Shared>,
    ctx: Arc<Explicit>,
    stream: TcpStream,
    prefix: Vec<u8>,
    peer: SocketAddr,
) {
    let hello_timeout = shared.generation().config().proxy.hello_timeout;
    let local = stream.local_addr().unwrap_or(peer);
    let io = TokioIo::new(PrefixedIo::new(prefix, stream));
    let conn = Arc::new(Conn {
        shared: shared.clone(),
        ctx,
        peer,
        local,
    });
    let svc = hyper::service::service_fn(move |req| {
        let c = conn.clone();
        async move { Ok::<_, Infallible>(c.request(req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(hello_timeout)
        .max_buf_size(crate::detect::MAX_HEAD)
        .keep_alive(true);
    let served = builder.serve_connection(io, svc);
    tokio::select! {
        r = served => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "explicit HTTP connection ended");
            }
        }
        why = crate::drain::closed(&shared, "") => {
            tracing::debug!(why, "explicit HTTP connection closed");
        }
    }
}

struct Conn {
    shared: Arc<Shared>,
    ctx: Arc<Explicit>,
    peer: SocketAddr,
    local: SocketAddr,
}

fn full(s: String) -> Body {
    Full::new(Bytes::from(s))
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn answer(code: StatusCode, reason: Option<Reason>, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(reason) = reason {
        r.headers_mut().insert(
            "x-portcullis-reason",
            HeaderValue::from_static(reason.as_str()),
        );
    }
    r
}

/// Headers that belong to one hop (RFC 9110 §7.6.1), the proxy's own, and
/// every header the Connection header lists.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(CONNECTION)
        .iter()
        .chain(h.get_all("proxy-connection").iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(n);
    }
}

/// The target of an absolute-form request, or why it is refused (`400`).
pub fn absolute_target(method: &Method, uri: &Uri) -> Result<(Target, u16), &'static str> {
    if method == Method::CONNECT {
        return Err("CONNECT must be the first request of a proxy connection");
    }
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err("https:// is not proxied as absolute-form: use CONNECT (HTTPS_PROXY)")
        }
        Some(_) => return Err("only http:// absolute-form requests are proxied"),
        None => return Err("not a proxy request: the target must be absolute-form http://"),
    }
    let auth = uri.authority().ok_or("the target has no authority")?;
    if auth.as_str().contains('@') {
        return Err("userinfo in the target is not allowed");
    }
    let target = Target::parse(auth.host()).ok_or("the target's host is not a valid name")?;
    Ok((target, auth.port_u16().unwrap_or(80)))
}

/// The Host header's host: `Ok(None)` when absent, `Err` when several or unreadable.
pub fn host_header(h: &HeaderMap) -> Result<Option<Target>, &'static str> {
    let mut all = h.get_all(HOST).iter();
    let Some(v) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err("several Host headers");
    }
    let s = v.to_str().map_err(|_| "a Host header that is not text")?;
    let host = if s.starts_with('[') {
        match s.find(']') {
            Some(i) => &s[..=i],
            None => return Err("a Host header with an unclosed ["),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => s,
        }
    };
    Target::parse(host)
        .map(Some)
        .ok_or("a Host header that is not a valid name")
}

impl Conn {
    async fn request(&self, req: Request<Incoming>) -> Response<Body> {
        let shared = &self.shared;
        let gen = shared.generation();
        let reg = &gen.registry;
        // Checked per request, not only at accept: a reload that removes a
        // client from explicit_clients applies to its kept-alive connection.
        if !super::client_allowed(&gen.config().proxy.explicit_clients, self.local, self.peer) {
            let mut flow = FlowLog::new(shared, self.peer, Mode::Explicit);
            flow.rec.protocol = Protocol::Http;
            flow.decided(reg, &Verdict::refused(Reason::ClientNotAllowed));
            flow.rec.error = Some("client outside explicit_clients".into());
            let mut r = answer(
                StatusCode::FORBIDDEN,
                Some(Reason::ClientNotAllowed),
                "portcullis: client outside explicit_clients\n".to_string(),
            );
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
        let (target, port) = match absolute_target(req.method(), req.uri()) {
            Ok(t) => t,
            Err(why) => {
                let mut flow = FlowLog::new(shared, self.peer, Mode::Explicit);
                flow.rec.protocol = Protocol::Http;
                flow.decided(reg, &Verdict::refused(Reason::Malformed));
                flow.rec.error = Some(why.to_string());
                let mut r = answer(
                    StatusCode::BAD_REQUEST,
                    Some(Reason::Malformed),
                    format!("portcullis: {why}\n"),
                );
                r.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
                return r;
            }
        };
        let mut flow = explicit_log(shared, self.peer, &target, port);
        flow.rec.protocol = Protocol::Http;
        // For absolute-form the Host header must name the same host.
        let mismatch = match host_header(req.headers()) {
            Ok(None) => None,
            Ok(Some(h)) if h == target => None,
            Ok(Some(h)) => {
                flow.rec.error = Some(format!(
                    "Host names {}",
                    h.name()
                        .map(str::to_string)
                        .unwrap_or_else(|| h.authority(port))
                ));
                Some(Reason::HostMismatch)
            }
            Err(why) => {
                flow.rec.error = Some(why.to_string());
                Some(Reason::Malformed)
            }
        };
        let entry = match mismatch {
            Some(r) => Err(r),
            None => match_entry(reg, &target, port, Some(Protocol::Http)).map(|(i, _)| i),
        };
        let v = verdict(reg, entry, port);
        let shown = target.authority(port);
        if v.decision == Decision::Deny {
            let r = v.reason.unwrap_or(Reason::NotInRegistry);
            flow.decided(reg, &v);
            return answer(
                StatusCode::FORBIDDEN,
                Some(r),
                format!("portcullis: {shown} denied: {}\n", r.as_str()),
            );
        }
        let (addrs, deadline) =
            match upstream_addrs(shared, &gen, &self.ctx, &v, &target, port).await {
                Ok(a) => a,
                Err(r) => {
                    flow.decided(reg, &Verdict::refused(r));
                    return answer(
                        StatusCode::FORBIDDEN,
                        Some(r),
                        format!("portcullis: {shown} denied: {}\n", r.as_str()),
                    );
                }
            };
        flow.decided(reg, &v);
        let entry = reg.entry_label(&v).to_string();
        let (up_counter, down_counter) = shared.metrics.byte_counters(&entry);
        let counters = flow.counters.clone();

        // The upstream request: origin-form, HTTP/1.1, one hop's headers gone.
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if !parts.headers.contains_key(HOST) {
            if let Some(a) = parts.uri.authority() {
                if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                    parts.headers.insert(HOST, v);
                }
            }
        }
        parts.uri = parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/")
            .parse()
            .unwrap_or_else(|_| Uri::from_static("/"));
        parts.version = Version::HTTP_11;
        let c_up = counters.clone();
        let body = body
            .map_frame(move |f| {
                if let Some(d) = f.data_ref() {
                    c_up.up.fetch_add(d.len() as u64, Ordering::Relaxed);
                    up_counter.inc_by(d.len() as u64);
                }
                f
            })
            .boxed_unsync();
        let upstream_req = Request::from_parts(parts, body);

        // Connect in a task that owns the connection for its whole life
        // (it keeps the socket registered with the loop guard meanwhile).
        let (tx, rx) = tokio::sync::oneshot::channel();
        let s = shared.clone();
        // resolution and connecting share one connect_timeout
        let timeout = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::spawn(async move {
            let c = match s.dialer.connect(&addrs, timeout, 0).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let Connected {
                stream,
                addr,
                guard: _guard,
            } = c;
            match hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream)).await {
                Ok((sender, conn)) => {
                    let _ = tx.send(Ok((sender, addr)));
                    let _ = conn.await;
                }
                Err(e) => {
                    let _ = tx.send(Err(ConnectError::Io(std::io::Error::other(e))));
                }
            }
        });
        let (mut sender, addr) = match rx.await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                connect_failed(shared, reg, &v, &mut flow, &e);
                let code = match e {
                    ConnectError::Timeout => StatusCode::GATEWAY_TIMEOUT,
                    _ => StatusCode::BAD_GATEWAY,
                };
                return answer(
                    code,
                    None,
                    format!("portcullis: {shown} unreachable: {}\n", e.as_str()),
                );
            }
            Err(_) => {
                flow.rec.error = Some("upstream: handshake task ended".into());
                return answer(
                    StatusCode::BAD_GATEWAY,
                    None,
                    "portcullis: upstream failed\n".into(),
                );
            }
        };
        flow.rec.upstream = Some(addr);
        let resp = match sender.send_request(upstream_req).await {
            Ok(r) => r,
            Err(e) => {
                flow.rec.error = Some(format!("upstream: {e}"));
                return answer(
                    StatusCode::BAD_GATEWAY,
                    None,
                    format!("portcullis: {shown}: the upstream failed: {e}\n"),
                );
            }
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        // The flow is logged when the response body is done (or dropped).
        let body = body
            .map_frame(move |f| {
                let _ = &flow;
                if let Some(d) = f.data_ref() {
                    counters.down.fetch_add(d.len() as u64, Ordering::Relaxed);
                    down_counter.inc_by(d.len() as u64);
                }
                f
            })
            .boxed_unsync();
        Response::from_parts(parts, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_proxy_headers_are_removed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Hop"),
            ("proxy-connection", "X-Other"),
            ("x-hop", "1"),
            ("x-other", "1"),
            ("proxy-authorization", "Basic eDp5"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "1"),
            ("host", "api.example.com"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept", "host"]);
    }

    #[test]
    fn absolute_form_targets() {
        let t = |m: Method, u: &str| absolute_target(&m, &u.parse::<Uri>().unwrap());
        assert_eq!(
            t(Method::GET, "http://API.example.com/x"),
            Ok((Target::Name("api.example.com".into()), 80))
        );
        assert_eq!(
            t(Method::POST, "http://[2001:db8::10]:8080/"),
            Ok((Target::Ip("2001:db8::10".parse().unwrap()), 8080))
        );
        assert!(t(Method::GET, "https://api.example.com/").is_err());
        assert!(t(Method::GET, "/origin-form").is_err());
        assert!(t(Method::GET, "ftp://api.example.com/").is_err());
        assert!(t(Method::GET, "http://user@api.example.com/").is_err());
        assert!(t(Method::CONNECT, "api.example.com:443").is_err());
    }

    #[test]
    fn host_headers() {
        let h = |vals: &[&str]| {
            let mut m = HeaderMap::new();
            for v in vals {
                m.append(HOST, HeaderValue::from_str(v).unwrap());
            }
            host_header(&m)
        };
        assert_eq!(h(&[]), Ok(None));
        assert_eq!(
            h(&["API.example.com:8080"]),
            Ok(Some(Target::Name("api.example.com".into())))
        );
        assert_eq!(
            h(&["[2001:db8::10]:80"]),
            Ok(Some(Target::Ip("2001:db8::10".parse().unwrap())))
        );
        assert!(h(&["a.example.com", "b.example.com"]).is_err());
        assert!(h(&["bad name"]).is_err());
    }
}
