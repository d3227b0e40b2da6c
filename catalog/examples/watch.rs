//! Prints the wharf catalog as it changes: the first line is the listed state, then one line
//! per change. `cargo run -p wharf-catalog --example watch -- [ETCD_URL] [PREFIX]`.

use catalog::watch::WatchConfig;
use catalog::{CatalogView, Diff, EtcdConfig, EtcdStore, Key, Keyspace, Value, Watcher};

fn describe(value: &Value) -> String {
    match value {
        Value::Instance(i) => format!(
            "{}:{} version={} weight={} state={:?}",
            i.addr, i.port, i.version, i.weight, i.state
        ),
        Value::Health(h) => format!("{:?} by {} ({})", h.status, h.checker, h.output),
        Value::Config(c) => format!("split={:?} algorithm={:?}", c.split, c.algorithm),
        Value::Node(n) => format!("node at {} version {}", n.addr, n.version),
        Value::Checker(c) => format!("checker version {}", c.version),
        Value::Rollout(r) => format!("rollout {r}"),
    }
}

fn key_name(ks: &Keyspace, key: &Key) -> String {
    ks.build(key)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let endpoint = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:2379".into());
    let ks = Keyspace::new(&args.next().unwrap_or_else(|| "/wharf/v1".into()))?;
    let store = EtcdStore::connect(&EtcdConfig::new([endpoint.clone()])).await?;
    let prefixes = vec![ks.services(), ks.nodes(), ks.checkers()];
    let mut watcher = Watcher::spawn(store, ks.clone(), WatchConfig::new(prefixes));
    println!("watching {endpoint} under {ks} (Ctrl-C to stop)");
    let mut view = CatalogView::default();
    while let Some(update) = watcher.next().await {
        for diff in &update.diffs {
            match diff {
                Diff::Reset(s) => {
                    println!("[rev {}] listed {} keys", s.revision, s.entries.len());
                    for e in &s.entries {
                        println!("  {} = {}", key_name(&ks, &e.key), describe(&e.value));
                    }
                }
                Diff::Put(e) => println!(
                    "[rev {}] put {} = {}",
                    update.revision,
                    key_name(&ks, &e.key),
                    describe(&e.value)
                ),
                Diff::Delete(k) => {
                    println!("[rev {}] delete {}", update.revision, key_name(&ks, k))
                }
            }
        }
        view.apply(update);
        let instances = view.instances().count();
        println!(
            "  -> {} services, {instances} instances, {} nodes",
            view.services.len(),
            view.nodes.len()
        );
    }
    Ok(())
}
