//! Writes the CRD YAML of both kinds to stdout (`cargo run -p sva-operator --bin crdgen`);
//! `crds/sva.io.yaml` and the chart's `crds/` hold its output (tests fail on drift).
fn main() {
    print!("{}", sva_operator::crd::crds_yaml());
}
