//! A throw-away test CA and one server certificate, made with openssl once per
//! test process (EC P-256, so it takes a few tens of milliseconds).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::proc::Cmd;

/// DNS names in the server certificate's subjectAltName.
pub const CERT_DNS_NAMES: &[&str] = &[
    "api.example.com",
    "*.files.example.com",
    "other.example.net",
    "*.example.org",
    "example.org",
    "*.example.com",
    "example.com",
    "*.example.net",
    "example.net",
    "localhost",
];

/// IP addresses in the server certificate's subjectAltName.
pub const CERT_IPS: &[&str] = &[
    "192.0.2.1",
    "192.0.2.10",
    "192.0.2.11",
    "198.51.100.7",
    "203.0.113.5",
    "127.0.0.1",
    "2001:db8::1",
    "2001:db8::10",
    "2001:db8::11",
    "::1",
];

#[derive(Debug)]
pub struct Pki {
    pub dir: PathBuf,
    /// PEM of the CA: give it to curl (`--cacert`) or `openssl s_client -CAfile`.
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// the upstreams' certificate (signed by the CA) and key, PEM
    pub cert: PathBuf,
    pub key: PathBuf,
}

static PKI: OnceLock<Pki> = OnceLock::new();

/// The test PKI, generated on first use.
pub fn pki() -> &'static Pki {
    PKI.get_or_init(generate)
}

fn openssl(dir: &Path, args: &[&str]) {
    Cmd::new("openssl")
        .args(args)
        .env("OPENSSL_CONF", "/dev/null")
        .env("RANDFILE", dir.join(".rnd"))
        .run()
        .ok();
}

fn generate() -> Pki {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).expect("CARGO_TARGET_TMPDIR");
    // remove what earlier, dead test processes left
    if let Ok(rd) = std::fs::read_dir(&base) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name
                .strip_prefix("pki-")
                .and_then(|p| p.parse::<u32>().ok())
            {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
    let dir = base.join(format!("pki-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("pki dir");
    set_mode(&dir, 0o755);
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();

    openssl(
        &dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.crt"),
            "-days",
            "3650",
            "-subj",
            "/CN=portcullis test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        &dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &p("server.key"),
            "-out",
            &p("server.csr"),
            "-subj",
            "/CN=api.example.com",
        ],
    );
    let sans: Vec<String> = CERT_DNS_NAMES
        .iter()
        .map(|n| format!("DNS:{n}"))
        .chain(CERT_IPS.iter().map(|i| format!("IP:{i}")))
        .collect();
    std::fs::write(
        dir.join("server.ext"),
        format!(
            "basicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\n\
             subjectKeyIdentifier=hash\n\
             authorityKeyIdentifier=keyid,issuer\n\
             subjectAltName={}\n",
            sans.join(",")
        ),
    )
    .expect("write server.ext");
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-out",
            &p("server.crt"),
            "-days",
            "825",
            "-extfile",
            &p("server.ext"),
        ],
    );
    for f in ["ca.crt", "server.crt", "server.key", "ca.key"] {
        set_mode(&dir.join(f), 0o644);
    }
    Pki {
        ca_cert: dir.join("ca.crt"),
        ca_key: dir.join("ca.key"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        dir,
    }
}

pub(crate) fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
}
