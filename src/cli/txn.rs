//! `sluice txn list|describe`: the transactional ids the broker coordinates (ListTransactions,
//! DescribeTransactions; like `kafka-transactions.sh`).

use anyhow::Result;
use clap::Subcommand;
use futures_lite::future::block_on;
use sluice_client::admin;

use super::connect;

#[derive(Subcommand, Debug)]
pub enum TxnCommand {
    /// Every transactional id with its producer id and state.
    List,
    /// One transactional id: state, producer id and epoch, timeout, start, partitions.
    Describe {
        /// The transactional id.
        id: String,
    },
}

pub fn run(cmd: TxnCommand, brokers: &str) -> Result<()> {
    let mut c = connect(brokers)?;
    match cmd {
        TxnCommand::List => {
            let ts = block_on(admin::list_transactions(&mut c))?;
            println!("{:<40} {:>12}  STATE", "TRANSACTIONAL ID", "PRODUCER ID");
            for t in &ts {
                println!(
                    "{:<40} {:>12}  {}",
                    t.transactional_id.as_str(),
                    t.producer_id.0,
                    t.transaction_state.as_str()
                );
            }
        }
        TxnCommand::Describe { id } => {
            let t = block_on(admin::describe_transaction(&mut c, &id))?;
            println!("TRANSACTIONAL ID  {}", t.transactional_id.as_str());
            println!("STATE             {}", t.transaction_state.as_str());
            println!("PRODUCER ID       {}", t.producer_id.0);
            println!("PRODUCER EPOCH    {}", t.producer_epoch);
            println!("TIMEOUT MS        {}", t.transaction_timeout_ms);
            println!("START MS          {}", t.transaction_start_time_ms);
            for topic in &t.topics {
                for p in &topic.partitions {
                    println!("PARTITION         {}/{p}", topic.topic.as_str());
                }
            }
        }
    }
    Ok(())
}
