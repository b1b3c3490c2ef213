fn main() {
    println!("usher {}", env!("CARGO_PKG_VERSION"));
}
