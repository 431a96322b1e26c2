//! Host names as the registry and the detector see them: one normalisation
//! (lower case, one trailing dot dropped, IP literals are no name) shared by
//! config validation, detection and `explain`.

use std::net::IpAddr;

/// The outcome of normalising a name a client presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presented {
    /// A valid DNS name, lower-cased, without trailing dot.
    Name(String),
    /// An IP literal (`192.0.2.1`, `2001:db8::1`, `[2001:db8::1]`): no name.
    IpLiteral,
    /// Not a valid DNS name.
    Invalid,
}

/// Normalise a name from SNI, a Host header or the command line.
pub fn normalize(raw: &str) -> Presented {
    let s = raw.strip_suffix('.').unwrap_or(raw);
    let unbracketed = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    if unbracketed.parse::<IpAddr>().is_ok() {
        return Presented::IpLiteral;
    }
    let lower = s.to_ascii_lowercase();
    if is_dns_name(&lower) {
        Presented::Name(lower)
    } else {
        Presented::Invalid
    }
}

/// A DNS name: 1..=253 chars, labels of 1..=63 chars from `[a-z0-9-_]`, no
/// label starting or ending with `-`. Underscores are tolerated because real
/// service names (`_dmarc`, some internal hosts) use them.
pub fn is_dns_name(s: &str) -> bool {
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    s.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    })
}

/// A registry host: an exact name or `*.` + a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Exact(String),
    /// The suffix without the leading `*.`; matches names with one or more
    /// labels before `.suffix`, never `suffix` itself.
    Wildcard(String),
}

/// Why a string is not a registry host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPatternError {
    #[error("a bare `*` host is not allowed: use outbound_traffic_policy = \"ALLOW_ANY\" to allow everything")]
    BareWildcard,
    #[error("host `{0}`: `*` is allowed only as the whole first label (`*.example.com`)")]
    MisplacedWildcard(String),
    #[error("host `{0}` is an IP address: put addresses in `addresses`, hosts are DNS names")]
    IpLiteral(String),
    #[error("host `{0}` is not a valid DNS name")]
    NotDnsName(String),
}

impl HostPattern {
    pub fn parse(raw: &str) -> Result<HostPattern, HostPatternError> {
        if raw == "*" {
            return Err(HostPatternError::BareWildcard);
        }
        let (wild, rest) = match raw.strip_prefix("*.") {
            Some(r) => (true, r),
            None => (false, raw),
        };
        if rest.contains('*') {
            return Err(HostPatternError::MisplacedWildcard(raw.to_string()));
        }
        match normalize(rest) {
            Presented::Name(n) => Ok(if wild {
                HostPattern::Wildcard(n)
            } else {
                HostPattern::Exact(n)
            }),
            Presented::IpLiteral => Err(HostPatternError::IpLiteral(raw.to_string())),
            Presented::Invalid => Err(HostPatternError::NotDnsName(raw.to_string())),
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            HostPattern::Exact(e) => e == name,
            HostPattern::Wildcard(suffix) => {
                name.len() > suffix.len() + 1
                    && name.ends_with(suffix.as_str())
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
            }
        }
    }

    pub fn is_wildcard(&self) -> bool {
        matches!(self, HostPattern::Wildcard(_))
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostPattern::Exact(e) => f.write_str(e),
            HostPattern::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation() {
        let cases = [
            (
                "API.Example.COM.",
                Presented::Name("api.example.com".into()),
            ),
            ("api.example.com", Presented::Name("api.example.com".into())),
            ("192.0.2.1", Presented::IpLiteral),
            ("2001:db8::1", Presented::IpLiteral),
            ("[2001:db8::1]", Presented::IpLiteral),
            ("", Presented::Invalid),
            (".", Presented::Invalid),
            ("a..b", Presented::Invalid),
            ("-a.com", Presented::Invalid),
            ("a b.com", Presented::Invalid),
            ("exämple.com", Presented::Invalid),
            (
                "xn--exmple-cua.com",
                Presented::Name("xn--exmple-cua.com".into()),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input), want, "{input:?}");
        }
        assert_eq!(normalize(&"a".repeat(64)), Presented::Invalid);
    }

    #[test]
    fn wildcard_semantics() {
        let w = HostPattern::parse("*.Example.com").unwrap();
        assert!(w.matches("a.example.com"));
        assert!(w.matches("a.b.example.com"));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("xexample.com"));
        assert!(!w.matches(".example.com"));
        assert_eq!(HostPattern::parse("*"), Err(HostPatternError::BareWildcard));
        for misplaced in ["a.*.com", "**.com"] {
            assert_eq!(
                HostPattern::parse(misplaced),
                Err(HostPatternError::MisplacedWildcard(misplaced.into()))
            );
        }
        assert_eq!(
            HostPattern::parse("192.0.2.1"),
            Err(HostPatternError::IpLiteral("192.0.2.1".into()))
        );
        assert_eq!(
            HostPattern::parse("a b.com"),
            Err(HostPatternError::NotDnsName("a b.com".into()))
        );
        assert_eq!(
            HostPattern::parse("Api.Example.com.").unwrap(),
            HostPattern::Exact("api.example.com".into())
        );
    }
}
