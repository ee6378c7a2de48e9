//! `acrf inspect`: what a LoRA file holds, for a person: its layout, modules, ranks, alphas and metadata.

use std::collections::BTreeMap;
use std::path::Path;

use acrf_worker::lora::Lora;
use anyhow::Result;

use crate::args::InspectArgs;

pub fn run(args: InspectArgs) -> Result<()> {
    print!("{}", describe(&args.file)?);
    Ok(())
}

fn describe(path: &Path) -> Result<String> {
    let file = Lora::read_file(path)?;
    let lora = &file.lora;
    let mut out = format!(
        "{}\n  format: {}\n  modules: {}\n  parameters: {}\n  dtype: {}\n",
        path.display(),
        file.format,
        lora.modules.len(),
        lora.parameter_count(),
        file.dtypes.iter().cloned().collect::<Vec<_>>().join(", ")
    );
    let mut by_shape: BTreeMap<(usize, String), usize> = BTreeMap::new();
    for m in lora.modules.values() {
        *by_shape.entry((m.rank(), format!("{}", m.alpha))).or_default() += 1;
    }
    for ((rank, alpha), n) in by_shape {
        out.push_str(&format!("  rank {rank}, alpha {alpha}: {n} modules\n"));
    }
    out.push_str("  modules:\n");
    for (name, m) in &lora.modules {
        out.push_str(&format!("    {name}  A {:?}  B {:?}  alpha {}\n", m.a.dims(), m.b.dims(), m.alpha));
    }
    if !lora.metadata.is_empty() {
        out.push_str("  metadata:\n");
        for (k, v) in &lora.metadata {
            out.push_str(&format!("    {k} = {v}\n"));
        }
    }
    Ok(out)
}
