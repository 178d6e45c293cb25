use clap::Args;

use super::Placement;
use crate::datapath;

#[derive(Args, Debug)]
pub struct TeardownArgs {
    #[command(flatten)]
    placement: Placement,
}

pub fn teardown(args: TeardownArgs) -> anyhow::Result<()> {
    let root = args.placement.pin_root();
    crate::pods::remove_all(&args.placement.pods_dir());
    datapath::teardown(&root)?;
    if let Ok(layout) = args.placement.layout(&[]) {
        layout.remove_empty();
    }
    log::info!("removed {}; enforcement is off", root.display());
    Ok(())
}
