//! VIP plumbing: add and remove addresses on a named interface through
//! rtnetlink (no `ip` command). Idempotent: adding an address that is
//! there, or removing one that is not, is reported and is not an error.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use thiserror::Error;

const EEXIST: i32 = 17;
const ENODEV: i32 = 19;

/// `PUT /v1/vips`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipRequest {
    pub interface: String,
    /// `203.0.113.5`, `203.0.113.5/32`, `2001:db8::5`, `2001:db8::5/64`;
    /// a bare address is a host route (/32, /128).
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct VipResult {
    pub interface: String,
    pub added: Vec<String>,
    pub already_present: Vec<String>,
    pub removed: Vec<String>,
    pub absent: Vec<String>,
}

#[derive(Debug, Error)]
pub enum VipError {
    #[error("{0:?} is not an IP address or address/prefix")]
    BadAddress(String),
    #[error("{0:?} is not an interface name")]
    BadInterface(String),
    #[error("no interface {0:?}")]
    NoInterface(String),
    #[error("netlink: {0}")]
    Netlink(String),
}

impl VipError {
    /// Whether the request (not the node) is at fault.
    pub fn is_bad_request(&self) -> bool {
        !matches!(self, VipError::Netlink(_))
    }
}

fn parse(text: &str) -> Result<IpNet, VipError> {
    let t = text.trim();
    t.parse::<IpNet>()
        .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| VipError::BadAddress(text.to_owned()))
}

fn code(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

/// Applies `req`. Every address is parsed before anything changes.
pub async fn apply(req: &VipRequest) -> Result<VipResult, VipError> {
    let name = req.interface.as_str();
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0']) {
        return Err(VipError::BadInterface(req.interface.clone()));
    }
    let add: Vec<IpNet> = req.add.iter().map(|a| parse(a)).collect::<Result<_, _>>()?;
    let remove: Vec<IpNet> = req
        .remove
        .iter()
        .map(|a| parse(a))
        .collect::<Result<_, _>>()?;
    let nl = |e: rtnetlink::Error| VipError::Netlink(e.to_string());
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| VipError::Netlink(e.to_string()))?;
    let driver = tokio::spawn(conn);
    let result = async {
        let link = handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_next()
            .await;
        let index = match link {
            Ok(Some(l)) => l.header.index,
            Ok(None) => return Err(VipError::NoInterface(name.to_owned())),
            Err(e) if code(&e) == Some(ENODEV) => {
                return Err(VipError::NoInterface(name.to_owned()))
            }
            Err(e) => return Err(nl(e)),
        };
        let mut out = VipResult {
            interface: name.to_owned(),
            ..VipResult::default()
        };
        for net in add {
            match handle
                .address()
                .add(index, net.addr(), net.prefix_len())
                .execute()
                .await
            {
                Ok(()) => out.added.push(net.to_string()),
                Err(e) if code(&e) == Some(EEXIST) => out.already_present.push(net.to_string()),
                Err(e) => return Err(nl(e)),
            }
        }
        for net in remove {
            let found = handle
                .address()
                .get()
                .set_link_index_filter(index)
                .set_address_filter(net.addr())
                .set_prefix_length_filter(net.prefix_len())
                .execute()
                .try_next()
                .await
                .map_err(nl)?;
            match found {
                Some(msg) => {
                    handle.address().del(msg).execute().await.map_err(nl)?;
                    out.removed.push(net.to_string());
                }
                None => out.absent.push(net.to_string()),
            }
        }
        Ok(out)
    }
    .await;
    driver.abort();
    result
}
