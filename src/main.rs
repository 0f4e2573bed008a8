//! `hare`: the broker binary (`cargo run --release`). See `hare_broker::cli`.

fn main() -> std::io::Result<()> {
    hare_broker::cli::main()
}
