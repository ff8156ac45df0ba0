//! The benchmarks' shaped uplink (benches/common/link.rs) does what the uplink figure
//! relies on: the delay is paid once per direction and not per previous chunk, the
//! bandwidth cap holds, the periodic cut shuts connections down.

#[path = "../benches/common/link.rs"]
mod link;

#[test]
fn the_bench_link_delays_caps_and_cuts_as_specified() {
    link::self_check().unwrap();
}
