use clap::Args;

use super::Placement;
use crate::datapath;

#[derive(Args, Debug)]
pub struct TeardownArgs {
    #[command(flatten)]
    placement: Placement,
    /// The DNS proxy's prefix, whose `local` route goes too.
    #[arg(long, value_name = "CIDR", default_value = "169.254.53.0/24")]
    dns_proxy_prefix: ipnet::Ipv4Net,
}

pub fn teardown(args: TeardownArgs) -> anyhow::Result<()> {
    let root = args.placement.pin_root();
    crate::pods::remove_all(&args.placement.pods_dir());
    datapath::teardown(&root)?;
    crate::dns::proxy::unroute_local(args.dns_proxy_prefix.trunc());
    if let Ok(layout) = args.placement.layout(&[]) {
        layout.remove_empty();
    }
    log::info!("removed {}; enforcement is off", root.display());
    Ok(())
}
