//! Distributors: how a VIP's traffic is spread over the amphorae of a
//! load balancer. The `linux-ecmp` driver routes the VIP on a Linux router
//! over a resilient nexthop group ([`nexthop`]), one nexthop per amphora.

pub mod nexthop;
