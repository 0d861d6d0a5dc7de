//! Test PKI and scratch directories: rcgen CAs that issue leaf
//! certificates (valid or expired), and temp dirs removed on drop.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: failing loudly is the point

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

/// A certificate authority.
pub struct Ca {
    pub cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// PEM certificate and key of a leaf for `names` (DNS names or IP
    /// addresses); `expired` makes one that ended in 2021.
    pub fn issue(&self, names: &[&str], expired: bool) -> (String, String) {
        let mut p =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Issues a leaf for `names` and writes its PEM certificate and key to
    /// `cert` and `key`.
    pub fn issue_to(&self, names: &[&str], cert: &std::path::Path, key: &std::path::Path) {
        let (c, k) = self.issue(names, false);
        std::fs::write(cert, c).unwrap();
        write_secret(key, &k);
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }
}

/// Writes a secret (key, token) readable by its owner only, as the
/// daemons demand.
pub fn write_secret(path: &std::path::Path, contents: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(contents.as_bytes()).unwrap();
}
