//! `sva-operator` binary.
fn main() {
    eprintln!("sva-operator: not implemented yet");
    std::process::exit(1);
}
