//! Writes `crds/<plural>.caravan.dev.yaml`, and the same files into the Helm
//! chart (`charts/caravan/crds/`), from the Rust types.
//! Usage: `cargo run -p caravan-api --bin crdgen` from the repository root.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for dir in caravan_api::CRD_DIRS {
        std::fs::create_dir_all(dir)?;
        for crd in caravan_api::v1alpha1::crds() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let path = std::path::Path::new(dir).join(format!("{name}.yaml"));
            std::fs::write(&path, caravan_api::crd_yaml(&crd)?)?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
