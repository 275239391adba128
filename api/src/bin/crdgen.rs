//! Writes `crds/<plural>.caravan.dev.yaml` from the Rust types.
//! Usage: `cargo run -p caravan-api --bin crdgen [OUT_DIR]` (default `crds`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).unwrap_or_else(|| "crds".into());
    std::fs::create_dir_all(&out)?;
    for crd in caravan_api::v1alpha1::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let path = std::path::Path::new(&out).join(format!("{name}.yaml"));
        std::fs::write(&path, caravan_api::crd_yaml(&crd)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
