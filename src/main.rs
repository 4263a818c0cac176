//! The `fleetcast` binary: parses the command line, builds the config, runs a node.

use clap::{Parser, Subcommand};
use fleetcast::config::{ApiKeyConfig, Config, LoginUser};
use fleetcast::model::Role;
use fleetcast::node::Node;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "fleetcast",
    version,
    about = "High-throughput WebSocket broker for fleet telematics"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker. Without a config file it starts in development mode.
    Serve {
        /// TOML config file.
        #[arg(long, env = "FLEETCAST_CONFIG")]
        config: Option<PathBuf>,
        /// Listen address (overrides server.listen).
        #[arg(long, env = "FLEETCAST_LISTEN")]
        listen: Option<SocketAddr>,
        /// Shard threads (overrides server.shards; 0 = one per core).
        #[arg(long, env = "FLEETCAST_SHARDS")]
        shards: Option<usize>,
        /// Shard IO driver, mio or io_uring (overrides server.io).
        #[arg(long, env = "FLEETCAST_IO")]
        io: Option<fleetcast::config::IoDriver>,
        /// Map tiles under the dashboard's map (overrides dashboard.tile_url).
        #[arg(long, env = "FLEETCAST_DASHBOARD_TILE_URL")]
        dashboard_tile_url: Option<String>,
        #[command(flatten)]
        demo: DemoArgs,
    },
    /// Mint an HS256 JWT for development.
    Token {
        #[arg(long, env = "FLEETCAST_JWT_SECRET")]
        secret: String,
        #[arg(long)]
        sub: String,
        #[arg(long)]
        tenant: String,
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        #[arg(long)]
        vehicle: Option<String>,
    },
    /// Validate a config file and explain what is wrong with it.
    CheckConfig { path: PathBuf },
    /// Print the argon2 hash (PHC string) of a password, for `[[itrack.users]]
    /// password_hash`. The password is read from standard input (one line; not echoed
    /// on a terminal).
    HashPassword {
        /// The password itself, instead of standard input. It then stays in the shell's
        /// history and is visible to other users in the process list: prefer stdin.
        #[arg(long)]
        password: Option<String>,
    },
    /// Print the SHA-256 (hex) of an API key, for `[[auth.api_keys]] key_sha256`, so that
    /// the config need not hold the key. The key is read from standard input (one line;
    /// not echoed on a terminal).
    HashKey {
        /// The key itself, instead of standard input (it then stays in the shell's
        /// history: prefer stdin).
        #[arg(long)]
        key: Option<String>,
    },
}

/// `serve --demo`: a simulated fleet publishing into the node (src/demo/).
#[derive(clap::Args)]
struct DemoArgs {
    /// Run a built-in simulated fleet that publishes live data (SPEC §9).
    #[arg(long, env = "FLEETCAST_DEMO")]
    demo: bool,
    /// Vehicles in the simulated fleet.
    #[arg(long, default_value_t = fleetcast::demo::DEFAULT_VEHICLES, requires = "demo")]
    demo_vehicles: usize,
    /// The tenant the simulated fleet publishes into (development mode's is fleet_001).
    #[arg(long, default_value = DEV_TENANT, requires = "demo")]
    demo_tenant: String,
    /// Seed of the simulation: the same seed drives the same routes.
    #[arg(long, default_value_t = 1, requires = "demo")]
    demo_seed: u64,
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("unknown role {s:?} (device, viewer, service, admin)"))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the OS random source is available");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Development mode's tenant.
const DEV_TENANT: &str = "fleet_001";
/// New connections per minute, per address and per user, that development mode allows
/// when it listens on loopback only (the SPEC's 10 stop a newcomer trying examples).
const DEV_LOOPBACK_CONNECTIONS_PER_MINUTE: u32 = 600;

/// The login of development mode's iTrack user.
const DEV_LOGIN: &str = "demo";
/// A tracker id the development banner shows how to feed and follow.
const DEV_TRACKER: &str = "15564";

/// Development mode: one tenant, a key per role and an iTrack login user (whose password
/// is returned, to be printed once), printed for the user.
fn dev_config(mut cfg: Config) -> anyhow::Result<(Config, String)> {
    for role in [Role::Device, Role::Viewer, Role::Service, Role::Admin] {
        let any: Vec<String> = if role == Role::Device {
            vec!["*".into()]
        } else {
            vec![]
        };
        cfg.auth.api_keys.push(ApiKeyConfig {
            key: format!("dev-{}-{}", role.name(), random_hex(12)),
            key_sha256: None,
            user_id: format!("dev-{}", role.name()),
            tenant: DEV_TENANT.into(),
            role,
            // Explicitly every vehicle of the tenant (a device key with no vehicles may
            // publish for none); the banner says so.
            vehicles: any.clone(),
            drivers: any.clone(),
            trips: any,
        });
    }
    cfg.auth.jwt_hs256_secret = Some(random_hex(24));
    let password = random_hex(8);
    cfg.itrack.users.push(LoginUser {
        login: DEV_LOGIN.into(),
        password_hash: fleetcast::sessions::hash_password(&password)?,
        tenant: "fleet_001".into(),
        trackers: vec!["*".into()],
    });
    Ok((cfg, password))
}

/// Development mode listening on loopback only: only this machine connects, so the
/// new-connection rates are raised for the person trying it (other limits stay).
fn dev_loopback_limits(cfg: &mut Config) {
    if cfg.server.listen.ip().is_loopback() {
        let l = &mut cfg.limits;
        l.new_connections_per_minute_per_ip = DEV_LOOPBACK_CONNECTIONS_PER_MINUTE;
        l.new_connections_per_minute_per_user = DEV_LOOPBACK_CONNECTIONS_PER_MINUTE;
    }
}

fn print_dev_banner(cfg: &Config, addr: SocketAddr, password: &str) {
    println!("fleetcast development mode: no config file given, tenant fleet_001 created.");
    println!("API keys (valid until this process exits):");
    for k in cfg
        .auth
        .api_keys
        .iter()
        .filter(|k| k.user_id.starts_with("dev-"))
    {
        println!("  {:<8} {}", k.role.name(), k.key);
    }
    println!("  (the device key may publish for any vehicle, driver and trip of fleet_001)");
    println!("Paste these into a shell to run the README's examples:");
    for k in cfg
        .auth
        .api_keys
        .iter()
        .filter(|k| k.user_id.starts_with("dev-"))
    {
        println!(
            "  export {}_KEY={}",
            k.role.name().to_ascii_uppercase(),
            k.key
        );
    }
    println!("  export FLEETCAST=http://{addr}");
    let admin = &cfg.auth.api_keys[3].key;
    println!("Dashboard (signed in as admin; the key is in the URL fragment, never sent):");
    println!("  http://{addr}/#key={admin}");
    let l = &cfg.limits;
    println!(
        "Limits in force: {} new connections per minute per address and per user{}, \
         {} connections per user, {} messages per second per connection ({} for services), \
         one location update per vehicle per {} ms, messages up to {} bytes.",
        l.new_connections_per_minute_per_ip,
        if addr.ip().is_loopback() {
            " (raised for loopback in development mode)"
        } else {
            ""
        },
        l.max_connections_per_user,
        l.messages_per_second,
        l.for_role(Role::Service).messages_per_second,
        l.location_update_interval_ms,
        l.max_message_bytes,
    );
    let viewer = &cfg.auth.api_keys[1].key;
    println!(
        "JWT secret (fleetcast token --secret ...): {}",
        cfg.auth.jwt_hs256_secret.as_deref().unwrap_or("")
    );
    println!(
        "iTrack login (user {DEV_LOGIN}, password {password}, tenant fleet_001, all trackers):"
    );
    println!(
        "  curl -s -X POST http://{addr}/v2/user/auth -H 'Content-Type: application/json' \\\n    \
         -d '{{\"login\":\"{DEV_LOGIN}\",\"password\":\"{password}\"}}'"
    );
    println!("  (answers {{\"success\":true,\"hash\":\"...\"}}: subscribe with that hash)");
    println!("Connect a client (the viewer key; any key above works the same way):");
    for codec in fleetcast::dialect::CODECS {
        println!(
            "  {:<11} {}",
            codec.name(),
            codec.dev_hint(&addr.to_string(), viewer, "fleet_001")
        );
    }
    let device = &cfg.auth.api_keys[0].key;
    println!("Feed tracker {DEV_TRACKER} a position (the device key):");
    println!(
        "  curl -s -X POST http://{addr}/v1/publish -H 'Authorization: Bearer {device}' \\\n    \
         -H 'Content-Type: application/json' -d '{{\"type\":\"location_update\",\"payload\":\
         {{\"vehicle_id\":\"{DEV_TRACKER}\",\"location\":{{\"latitude\":52.52,\"longitude\":\
         13.405,\"speed\":42,\"heading\":90}}}}}}'"
    );
    println!("Health:        http://{addr}/healthz");
}

fn serve(
    config: Option<PathBuf>,
    listen: Option<SocketAddr>,
    shards: Option<usize>,
    io: Option<fleetcast::config::IoDriver>,
    tile_url: Option<String>,
    demo: DemoArgs,
) -> anyhow::Result<ExitCode> {
    let dev = config.is_none();
    let (mut cfg, dev_password) = match &config {
        Some(p) => (Config::read(p)?, String::new()),
        None => dev_config(Config::default())?,
    };
    if let Some(l) = listen {
        cfg.server.listen = l;
    }
    if let Some(s) = shards {
        cfg.server.shards = s;
    }
    if let Some(io) = io {
        cfg.server.io = io;
    }
    if tile_url.is_some() {
        cfg.dashboard.tile_url = tile_url;
    }
    if dev {
        dev_loopback_limits(&mut cfg);
    }
    let demo_key = demo
        .demo
        .then(|| fleetcast::demo::add_credential(&mut cfg, &demo.demo_tenant, &random_hex(16)));
    // The validation `check-config` runs (`Node::start` runs it again).
    let origin = match &config {
        Some(p) => p.display().to_string(),
        None => "development config".into(),
    };
    let checked = match cfg.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}", with_origin(&origin, "error: ", &e.0));
            return Ok(ExitCode::FAILURE);
        }
    };
    for w in &checked.warnings {
        tracing::warn!("{origin}: {w}");
    }
    let shown = cfg.clone();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ])?;
    let node = Node::start(cfg)?;
    let addr = node.local_addr();
    if dev {
        print_dev_banner(&shown, addr, &dev_password);
    }
    let sim = match demo_key {
        Some(key) => {
            println!(
                "Demo: {} simulated vehicles publishing into tenant {} (seed {}).",
                demo.demo_vehicles, demo.demo_tenant, demo.demo_seed
            );
            Some(fleetcast::demo::Demo::start(fleetcast::demo::Settings {
                addr,
                key,
                vehicles: demo.demo_vehicles,
                seed: demo.demo_seed,
                interval: shown.limits.location_update_interval(),
            })?)
        }
        None => None,
    };
    let io = node.io_driver();
    tracing::info!(%addr, shards = node.shard_count(), %io, "fleetcast listening");
    println!(
        "listening on {addr} with {} shards (io: {io})",
        node.shard_count()
    );
    if let Some(tls) = node.tls_addr() {
        tracing::info!(%tls, "fleetcast listening for TLS (wss://, https://)");
        println!("listening for TLS on {tls}");
    }
    for sig in signals.forever() {
        if sig == signal_hook::consts::SIGHUP {
            reload_credentials(&node, config.as_deref());
            reload_tls_on_sighup(&node);
            continue;
        }
        tracing::info!(signal = sig, "shutting down");
        break;
    }
    if let Some(sim) = sim {
        sim.stop();
    }
    node.shutdown();
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// SIGHUP, credentials part: re-reads the config file and, when the whole file is valid,
/// takes its API keys and revocation lists (nothing else); the open connections of
/// revoked or removed credentials are closed with 4001. A bad file changes nothing.
fn reload_credentials(node: &Node, config: Option<&Path>) {
    let Some(path) = config else {
        tracing::warn!("SIGHUP: development mode has no config file to reload");
        return;
    };
    let cfg = match Config::read(path) {
        Ok(c) => c,
        Err(e) => return tracing::error!("SIGHUP: credentials not reloaded: {e}"),
    };
    if let Err(e) = cfg.validate() {
        let e = e.to_string().replace('\n', "; ");
        return tracing::error!("SIGHUP: credentials not reloaded, {}: {e}", path.display());
    }
    match node.reload_credentials(&cfg) {
        Ok(()) => tracing::info!(
            keys = cfg.auth.api_keys.len(),
            revoked_token_ids = cfg.auth.revoked_token_ids.len(),
            revoked_keys = cfg.auth.revoked_keys.len(),
            "SIGHUP: credentials reloaded from {}",
            path.display()
        ),
        Err(e) => tracing::error!("SIGHUP: credentials not reloaded: {e}"),
    }
}

/// SIGHUP, TLS part: new connections get the certificate and key read again; open ones
/// keep theirs. A file that does not load is refused (logged) and the old one stays.
fn reload_tls_on_sighup(node: &Node) {
    if node.tls_addr().is_some() && node.reload_tls().is_err() {
        eprintln!("TLS reload refused: the previous certificate stays in use (see the log)");
    }
}

/// `check-config`: parses the file and runs the validation `serve` runs (key files
/// included), printing every problem on its own line; fails exactly when `serve` would
/// refuse the file.
fn check_config(path: &Path) -> ExitCode {
    let origin = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read {origin}: {e}");
            return ExitCode::FAILURE;
        }
    };
    // TOML syntax, types and unknown keys: every one (serde alone stops at the first),
    // then the checks of the lines without such errors.
    let (parse_errors, cfg) = fleetcast::config_errors::parse_all(&text);
    let cfg = match cfg {
        Some(c) if parse_errors.is_empty() => c,
        rest => {
            let mut all = parse_errors;
            if let Some(Err(e)) = rest.map(|c| c.validate()) {
                all.extend(e.0);
            }
            eprintln!("{}", with_origin(&origin, "error: ", &all));
            eprintln!("{origin}: {} error(s)", all.len());
            return ExitCode::FAILURE;
        }
    };
    match cfg.validate() {
        Ok(checked) => {
            if !checked.warnings.is_empty() {
                eprintln!("{}", with_origin(&origin, "warning: ", &checked.warnings));
            }
            println!("{origin}: ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}", with_origin(&origin, "error: ", &e.0));
            eprintln!("{origin}: {} error(s)", e.0.len());
            ExitCode::FAILURE
        }
    }
}

/// One line of standard input without its line ending. On a terminal it asks on stderr
/// (`prompt`) and turns echo off meanwhile (`stty`; if that fails the secret is echoed).
fn read_secret(prompt: &str) -> anyhow::Result<String> {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(std::process::Stdio::inherit())
            .status()
            .is_ok_and(|s| s.success())
    };
    let mut echo_off = false;
    if tty {
        eprint!("{prompt}: ");
        std::io::stderr().flush()?;
        echo_off = stty("-echo");
    }
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if echo_off {
        stty("echo");
        eprintln!();
    }
    read?;
    let line = line.strip_suffix('\n').unwrap_or(&line);
    Ok(line.strip_suffix('\r').unwrap_or(line).to_string())
}

/// One line per message, each prefixed with where the config came from.
fn with_origin(origin: &str, kind: &str, messages: &[String]) -> String {
    messages
        .iter()
        .map(|m| format!("{origin}: {kind}{m}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn main() -> ExitCode {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in files and journals.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            // The message and its causes on one line; the backtrace only when asked for.
            let asked = ["RUST_BACKTRACE", "RUST_LIB_BACKTRACE"]
                .iter()
                .any(|v| std::env::var(v).is_ok_and(|v| v != "0"));
            if asked {
                eprintln!("error: {e:?}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve {
            config,
            listen,
            shards,
            io,
            dashboard_tile_url,
            demo,
        } => return serve(config, listen, shards, io, dashboard_tile_url, demo),
        Command::Token {
            secret,
            sub,
            tenant,
            role,
            ttl,
            vehicle,
        } => {
            let exp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
                + ttl;
            println!(
                "{}",
                fleetcast::auth::mint_hs256(&secret, &sub, &tenant, role, exp, vehicle.as_deref())?
            );
        }
        Command::CheckConfig { path } => return Ok(check_config(&path)),
        Command::HashPassword { password } => {
            let password = match password {
                Some(p) => p,
                None => read_secret("password")?,
            };
            anyhow::ensure!(!password.is_empty(), "the password is empty");
            println!("{}", fleetcast::sessions::hash_password(&password)?);
        }
        Command::HashKey { key } => {
            let key = match key {
                Some(k) => k,
                None => read_secret("api key")?,
            };
            // The rule `check-config` applies to a key given in clear.
            anyhow::ensure!(
                key.len() >= 16,
                "an API key must be at least 16 characters (it is {})",
                key.len()
            );
            println!("{}", fleetcast::auth::sha256_hex(&key));
        }
    }
    Ok(ExitCode::SUCCESS)
}
