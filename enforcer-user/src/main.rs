fn main() {
    // The agent logs what it does; one-shot commands only what went wrong.
    let agent = std::env::args().nth(1).as_deref() == Some("run");
    let level = if agent { "info" } else { "warn" };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
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
