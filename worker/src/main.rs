fn main() { println!("usher-worker {}", usher_worker::version()); }
