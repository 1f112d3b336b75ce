//! The `armd` command line: parses flags, sets up logging and hands over to a module's `run`.
//! Each subcommand is one variant of [`Command`] with its own argument struct, so adding one means adding
//! a variant and a match arm.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use armd::daemon::{self, config::Config, telemetry};

/// Active reward modeling daemon: D-optimal preference-pair selection for Bradley–Terry reward heads
/// over Kafka.
#[derive(Parser, Debug)]
#[command(name = "armd", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon: consume responses and labels, publish comparison requests and model snapshots.
    ///
    /// Stops gracefully on SIGTERM or SIGINT (finishes the round, writes a checkpoint, exits 0).
    Run(RunArgs),
    /// Replay the paper's protocol offline on a dataset and compare selection strategies.
    Simulate(Box<armd::simulate::SimulateArgs>),
    /// Watch armd learn in under a minute, nothing to install: two real daemons (armd's strategy and
    /// random selection) on an embedded Kafka mock cluster, fed the same synthetic responses and
    /// answered by simulated noisy annotators; live progress on stderr, /metrics while it runs, and a
    /// summary table, curves.csv and an SVG plot of held-out Spearman vs labels at the end.
    Demo(Box<armd::demo::DemoArgs>),
    /// Manage the Kafka topics armd uses (armd run never creates them; it waits for them).
    Topics(TopicsArgs),
}

#[derive(Args, Debug)]
struct TopicsArgs {
    #[command(subcommand)]
    action: TopicsAction,
}

#[derive(Subcommand, Debug)]
enum TopicsAction {
    /// Create the five topics named in the configuration, with the partitions, replication factor and
    /// retention each needs (README "Topics"). Topics that exist are left as they are and reported.
    Create(TopicsCreateArgs),
}

#[derive(Args, Debug)]
struct TopicsCreateArgs {
    /// Configuration file (TOML), as for `armd run` (brokers, topic names, TTLs, [kafka.settings]).
    #[arg(long, short, value_name = "PATH", env = "ARMD_CONFIG")]
    config: PathBuf,
    /// Partitions of the responses topic (instances of one consumer group split them).
    #[arg(long, default_value_t = 6)]
    response_partitions: i32,
    /// Replication factor of every topic (use 3 on a production cluster).
    #[arg(long, default_value_t = 1)]
    replication_factor: i32,
    /// Print what would be created and exit.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Configuration file (TOML). Every key can be overridden with ARMD__SECTION__KEY environment
    /// variables, e.g. ARMD__KAFKA__BROKERS=host:9092. See config/armd.toml for all keys.
    #[arg(long, short, value_name = "PATH", env = "ARMD_CONFIG")]
    config: PathBuf,
}

fn main() -> ExitCode {
    // Before any thread starts: large blocks on mmap, so freed pool matrices go back to the system.
    daemon::alloc::fix_mmap_threshold();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Simulate(args) => armd::simulate::cli_main(*args),
        Command::Demo(args) => armd::demo::cli_main(*args),
        Command::Topics(TopicsArgs {
            action: TopicsAction::Create(args),
        }) => topics_create(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("armd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<()> {
    let cfg = Config::load(&args.config)?;
    telemetry::init_logging(&cfg.log)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("armd-io")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(daemon::run(cfg, shutdown_signal()))
}

fn topics_create(args: TopicsCreateArgs) -> Result<()> {
    use armd::daemon::topics;
    let cfg = Config::load(&args.config)?;
    let opts = topics::TopicOptions {
        response_partitions: args.response_partitions,
        replication_factor: args.replication_factor,
    };
    let specs = topics::plan(&cfg, &opts)?;
    if args.dry_run {
        for s in &specs {
            println!("{}", topics::describe(s, None));
        }
        return Ok(());
    }
    let outcomes = topics::create(&cfg, &specs, cfg.kafka.startup_timeout)?;
    for (s, o) in specs.iter().zip(&outcomes) {
        println!("{}", topics::describe(s, Some(o)));
    }
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install the SIGTERM handler; only Ctrl-C stops armd");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
