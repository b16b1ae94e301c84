//! The cluster's store from the command line: connecting to it (a server's
//! `--etcd`, or the file's `etcd = [..]`) and `token add|revoke|list`.

use std::io::BufRead as _;
use std::sync::Arc;

use anyhow::{Context, bail};
#[cfg(feature = "etcd")]
use zlayer_tunnel::cluster::ClusterKeys;
use zlayer_tunnel::cluster::StoredToken;
use zlayer_tunnel::{ClusterStore, TokenScope};

use crate::cli::{StoreArgs, TokenArg};

/// The cluster's store, if `--etcd` (or the file's `etcd`) names one.
pub(crate) async fn connect(
    args: &StoreArgs,
    file_endpoints: &[String],
    file_prefix: Option<&str>,
) -> anyhow::Result<Option<Arc<dyn ClusterStore>>> {
    let mut args = args.clone();
    if args.etcd.is_empty() {
        args.etcd = file_endpoints.to_vec();
    }
    if args.cluster_prefix.is_none() {
        args.cluster_prefix = file_prefix.map(str::to_owned);
    }
    if args.etcd.is_empty() {
        return Ok(None);
    }
    open(&args).await.map(Some)
}

#[cfg(feature = "etcd")]
async fn open(args: &StoreArgs) -> anyhow::Result<Arc<dyn ClusterStore>> {
    let prefix = args.cluster_prefix.as_deref();
    let keys = ClusterKeys::new(prefix.unwrap_or(zlayer_tunnel::cluster::DEFAULT_PREFIX))
        .context("--cluster-prefix")?;
    let user = match (&args.etcd_user, &args.etcd_password) {
        (Some(user), Some(password)) => Some((user.clone(), password.as_str().into())),
        (Some(_), None) => bail!("--etcd-user needs its password in ZLAYER_TUNNEL_ETCD_PASSWORD"),
        (None, _) => None,
    };
    let ca_pem = match &args.etcd_ca {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("--etcd-ca {}", path.display()))?)
        }
        None => None,
    };
    let options = zlayer_tunnel::EtcdOptions {
        endpoints: args.etcd.clone(),
        keys,
        user,
        ca_pem,
    };
    let endpoints = args.etcd.join(",");
    let store = zlayer_tunnel::EtcdStore::connect(options)
        .await
        .with_context(|| format!("--etcd {endpoints}"))?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "etcd"))]
async fn open(_: &StoreArgs) -> anyhow::Result<Arc<dyn ClusterStore>> {
    bail!(
        "--etcd: this zlayer-tunnel was built without the cluster store; build it with `cargo build --release --features etcd` (needs protoc: apt-get install protobuf-compiler)"
    )
}

/// Runs `work` with the store `args` names, on a runtime of its own; again,
/// twice at most, if the store could not be asked (an etcd member just lost
/// may still be sent the first request; the client moves to the others).
fn with_store<T>(
    args: &StoreArgs,
    work: impl AsyncFn(&dyn ClusterStore) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    if args.etcd.is_empty() {
        bail!("give the cluster's store: --etcd URL");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let store = open(args).await?;
        let mut tries = 0;
        loop {
            tries += 1;
            match work(&*store).await {
                Err(e) if tries < 3 && unreachable(&e) => {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                done => return done,
            }
        }
    })
}

/// True when `error` is the store's being unreachable.
fn unreachable(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<zlayer_tunnel::StoreError>(),
        Some(zlayer_tunnel::StoreError::Unreachable(_))
    )
}

/// The hash of the token `which` names: `--hash`, or `--token` or stdin hashed.
fn token_hash(which: &TokenArg) -> anyhow::Result<String> {
    if let Some(hash) = &which.hash {
        return Ok(hash.clone());
    }
    let token = match &which.token {
        Some(token) => token.clone(),
        None => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the token from stdin")?;
            line.trim().to_owned()
        }
    };
    if token.is_empty() {
        bail!("no token: give it on stdin, with --token, or its hash with --hash");
    }
    Ok(zlayer_tunnel::hash_token(&token))
}

/// `zlayer-tunnel token add`: stores the token's hash with its scope.
pub(crate) fn add_token(
    args: &StoreArgs,
    which: &TokenArg,
    (register, access, ports): (Vec<String>, Vec<String>, Vec<(u16, u16)>),
    visitors: zlayer_tunnel::visitor_rules::VisitorRules,
) -> anyhow::Result<()> {
    let scope = TokenScope {
        register: (!register.is_empty()).then_some(register),
        access: (!access.is_empty()).then_some(access),
        ports: (!ports.is_empty()).then_some(ports),
        visitors,
        peer: false,
    };
    let token = StoredToken::new(&token_hash(which)?, scope).context("--hash")?;
    let hash = token.hash.clone();
    with_store(args, async |store| {
        store.put_token(token.clone()).await?;
        println!("{hash}");
        Ok(())
    })
}

/// `zlayer-tunnel token revoke`: removes the token; its tunnels close.
pub(crate) fn revoke_token(args: &StoreArgs, which: &TokenArg) -> anyhow::Result<()> {
    let hash = token_hash(which)?;
    with_store(args, async |store| {
        if !store.revoke_token(&hash).await? {
            bail!("no token with hash {hash} in the store");
        }
        println!("{hash}");
        Ok(())
    })
}

/// `zlayer-tunnel token list`: `HASH register=.. access=.. ports=..` per token.
pub(crate) fn list_tokens(args: &StoreArgs) -> anyhow::Result<()> {
    with_store(args, async |store| {
        for token in store.tokens().await? {
            let scope = &token.scope;
            let names = |list: &Option<Vec<String>>| {
                list.as_ref().map_or_else(|| "*".into(), |l| l.join(","))
            };
            let ports = scope
                .ports
                .as_ref()
                .map_or_else(|| "*".into(), |r| zlayer_tunnel::ports::format_ranges(r));
            let (allow, deny) = scope.visitors.to_wire();
            let mut visitors = String::new();
            if !allow.is_empty() {
                visitors += &format!(" visitors_allow={allow}");
            }
            if !deny.is_empty() {
                visitors += &format!(" visitors_deny={deny}");
            }
            println!(
                "{} register={} access={} ports={}{visitors}",
                token.hash,
                names(&scope.register),
                names(&scope.access),
                ports
            );
        }
        Ok(())
    })
}
