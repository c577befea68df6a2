//! Watchers of one job share their reads: however many streams follow a job, one query at a
//! time reads its new outcomes, and watchers woken by the same change take that query's rows.
//! So 300 watchers of a job cost one database connection per change, not 300.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Instant,
};

use fleetsync_common::JobId;

use crate::store::{OutcomeRecord, Store};

/// The feeds of the jobs being watched on this agent.
#[derive(Debug, Default, Clone)]
pub struct Feeds {
    jobs: Arc<Mutex<HashMap<JobId, Weak<Feed>>>>,
}

impl Feeds {
    /// The feed of a job, shared by its watchers while any holds it.
    pub fn feed(&self, job_id: &JobId) -> Arc<Feed> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(feed) = jobs.get(job_id).and_then(Weak::upgrade) {
            return feed;
        }
        jobs.retain(|_, feed| feed.strong_count() > 0);
        let feed = Arc::new(Feed::default());
        jobs.insert(job_id.clone(), Arc::downgrade(&feed));
        feed
    }
}

/// One job's reads: the last one, for the watchers that want the same rows.
#[derive(Debug, Default)]
pub struct Feed {
    last: tokio::sync::Mutex<Option<Read>>,
}

#[derive(Debug)]
struct Read {
    after: i64,
    started: Instant,
    rows: Arc<Vec<OutcomeRecord>>,
}

impl Feed {
    /// The job's outcomes after `after`, at most `limit`, read by a query that started no
    /// earlier than `woke` (so it sees every change the watcher was woken for): the last read's
    /// rows when they qualify, else a new read, one at a time for the job.
    pub async fn after(
        &self,
        store: &Store,
        job_id: &JobId,
        after: i64,
        limit: i64,
        woke: Instant,
    ) -> Result<Arc<Vec<OutcomeRecord>>, sqlx::Error> {
        let mut last = self.last.lock().await;
        if let Some(read) = last.as_ref()
            && read.after == after
            && read.started >= woke
        {
            return Ok(Arc::clone(&read.rows));
        }
        let started = Instant::now();
        let rows = Arc::new(store.outcomes_after(job_id, after, limit).await?);
        *last = Some(Read {
            after,
            started,
            rows: Arc::clone(&rows),
        });
        Ok(rows)
    }
}
