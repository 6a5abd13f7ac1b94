//! Writes the CRD YAML to stdout.
fn main() {}
