//! systemd readiness: `READY=1` on `$NOTIFY_SOCKET` once a daemon serves
//! (units with `Type=notify`). Without the variable (not under systemd)
//! nothing happens.

use std::os::unix::net::UnixDatagram;

/// Tells systemd the service is ready. Failures are logged, never fatal:
/// the service works either way.
pub fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let result = UnixDatagram::unbound().and_then(|s| {
        if let Some(name) = bytes.strip_prefix(b"@") {
            // An abstract socket.
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            s.send_to_addr(b"READY=1", &addr)
        } else {
            s.send_to(b"READY=1", &path)
        }
    });
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot notify systemd of readiness");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_the_notify_socket() {
        let dir = std::env::temp_dir().join(format!("siphon-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        // SAFETY of the test: no other thread of this test binary reads
        // NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &path);
        notify_ready();
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
