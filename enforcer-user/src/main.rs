fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .format_timestamp_millis()
        .init();
    match enforcer_user::cli::main() {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("enforcer: {err:#}");
            std::process::exit(1);
        }
    }
}
